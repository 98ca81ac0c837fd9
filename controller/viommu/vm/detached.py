"""A Machine that outlives the process that booted it (`viommu up`): its state.json, written
before its processes start and again as each one does; found again from another process
(`Machine.attach`); let go of, running (`release`). Machine takes these from here."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from viommu.vm import runs
from viommu.vm.backend_supervisor import DetachedBackend
from viommu.vm.console import ConsoleError
from viommu.vm.errors import MachineError

if TYPE_CHECKING:
    from viommu.vm.machine import Machine

log = logging.getLogger(__name__)


class DetachedMachine:
    """Machine's part for detached VMs (it is a base of Machine, and reaches into it)."""

    def _save_run_state(self: Machine, status: str) -> None:
        """state.json of a detached VM: written before its processes start ("starting", with
        this process's pid) and again as each one does, so it is never running unseen."""
        if self.run_dir is None:
            return
        backend_pid = self._backend.pid if self._backend is not None else None
        boot = self._prepared()
        runs.RunState(name=self.name, profile=self._profile_ref, accel=self.accel,
                      qemu_pid=self._qemu.pid, backend_pid=backend_pid, started=time.time(),
                      workdir=str(self.workdir), sockets=dict(self._sockets), arch=self.arch,
                      kernel=self.kernel_spec, kernel_release=boot.image.kernel.release,
                      kernel_origin=boot.image.kernel.origin, qemu=boot.qemu_description,
                      status=status, up_pid=os.getpid() if status == "starting" else None
                      ).save(self.run_dir)

    @classmethod
    def attach(cls, run_dir: Path | str) -> Machine:
        """The detached VM in `run_dir`, driven from this process. The backend's control
        socket is connected now; the console and QEMU's QMP on first use (each takes one
        client at a time). `release()` lets go of it, `shutdown()` ends it."""
        state = runs.RunState.load(Path(run_dir))
        vm = cls(state.profile, workdir=state.workdir, accel=state.accel, name=state.name,
                 run_dir=run_dir, kernel=state.kernel, arch=state.arch)
        vm._shell.lazy = True
        vm._qemu.adopt(state.qemu_pid)
        if not vm._qemu.running():
            raise MachineError(f"{state.name}'s QEMU (pid {state.qemu_pid}) is gone; see "
                               f"{state.workdir}/qemu.log")
        if state.backend_pid is not None:
            vm._backend = DetachedBackend(state.backend_pid, vm.control_socket,
                                          Path(state.workdir))
            vm._control.lazy = True
            if vm._backend.alive():  # else backend() says it is dead, and how
                try:
                    vm._control.connect()
                except MachineError:
                    if vm._backend.exit_status(timeout=1.0) is None:
                        raise
                    # it died as we connected: backend() says so, and how
        return vm

    def release(self: Machine) -> None:
        """Let go of a detached VM and leave it running: the guest's shell gets its echo and
        prompt back (for `viommu console`), and this process's connections close, whatever
        the guest does meanwhile."""
        try:
            self._shell.give_back()
        except (MachineError, ConsoleError, OSError) as exc:
            log.warning("%s: the guest's shell did not take its prompt back (%s); press Enter "
                        "in `viommu console` for one", self.name, exc)
        finally:
            self._close_connections()
            self._shell.lazy = self._qemu.qmp.lazy = self._control.lazy = True
