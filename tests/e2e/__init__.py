# A package, so that test modules here may share a basename with one in tests/unit
# (test_cli.py): pytest imports them as e2e.test_cli.
