/* blkverify: O_DIRECT block I/O with self-describing patterns, for a guest with busybox only.
 *
 *   blkverify DEV write|read|verify|rw seq|rand NBLOCKS [SEED] [BS]
 *   blkverify DEV live-write|live-read NBLOCKS SEED STOPFILE [BS]
 *   blkverify DEV randread NBLOCKS SECONDS [BS]       (IOPS, no verification)
 *   blkverify DEV seqwrite NBLOCKS [BS]               (MB/s, no verification)
 *
 * Every BS-byte block (default 4096) is filled with 64-bit words
 *   word[i] = (lba << 32) ^ (seed << 16) ^ i ^ 0x5a5a5a5a00000000
 * so a misdirected, stale or torn block names itself (and its seed) on failure.
 * "rand" visits every block once in a permuted order (LCG over a power of two).
 * The write pass ends with fdatasync (a FLUSH request when the device offers it).
 *
 * live-write: pass p (p = 0, 1, ...) writes every block in order with seed SEED + p, and
 * goes on past I/O errors, until STOPFILE exists at the end of a pass; then it reads every
 * block back and checks it holds the seed of its last write that succeeded (SEED - 1, the
 * disk's earlier pattern, if none did). live-read reads and verifies blocks written with
 * SEED, pass after pass, until STOPFILE exists. Both print the I/O buffer's guest-physical
 * address first (from /proc/self/pagemap: the buffer is locked in memory), so that a test
 * can revoke the device's access to that page, and one line per pass. live-write's last
 * line lists the blocks whose last write failed ("stale=LBA:SEED,...").
 *
 * Lines: "blkverify: key=value ..." and, last, "... result=PASS|FAIL"; exit 0 on PASS.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/fs.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static uint64_t word(uint64_t lba, uint64_t seed, uint64_t i)
{
	return (lba << 32) ^ (seed << 16) ^ i ^ 0x5a5a5a5a00000000ull;
}

static void fill(uint64_t *buf, size_t bs, uint64_t lba, uint64_t seed)
{
	for (size_t i = 0; i < bs / 8; i++)
		buf[i] = word(lba, seed, i);
}

static long check(const uint64_t *buf, size_t bs, uint64_t lba, uint64_t seed)
{
	for (size_t i = 0; i < bs / 8; i++)
		if (buf[i] != word(lba, seed, i))
			return (long)i;
	return -1;
}

/* Full-period LCG mod 2^k (k = bits of mask): with values >= n skipped, a permutation. */
static uint64_t next_rand(uint64_t x, uint64_t mask)
{
	return (x * 6364136223846793005ull + 1442695040888963407ull) & mask;
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* The guest-physical address of the page holding p (0 when pagemap does not say). */
static uint64_t phys_addr(const void *p)
{
	uint64_t entry = 0;
	long page = sysconf(_SC_PAGESIZE);
	int fd = open("/proc/self/pagemap", O_RDONLY);
	if (fd < 0)
		return 0;
	off_t off = (off_t)((uintptr_t)p / page) * 8;
	if (pread(fd, &entry, 8, off) != 8 || !(entry >> 63))
		entry = 0;
	close(fd);
	return entry ? (entry & ((1ull << 55) - 1)) * page : 0;
}

static int io(int fd, uint64_t *buf, size_t bs, uint64_t lba, int writing)
{
	off_t off = (off_t)(lba * bs);
	ssize_t got = writing ? pwrite(fd, buf, bs, off) : pread(fd, buf, bs, off);
	return got == (ssize_t)bs ? 0 : -1;
}

static int exists(const char *path)
{
	return access(path, F_OK) == 0;
}

static int live(int fd, uint64_t *buf, size_t bs, uint64_t n, uint64_t seed, const char *stop,
		int writing)
{
	uint64_t *expect = calloc(n, sizeof(*expect)), passes = 0, ios = 0, ioerrs = 0;
	long mismatches = 0;
	uint64_t gpa = phys_addr(buf);
	printf("blkverify: buffer gpa=%#" PRIx64 " bs=%zu\n", gpa, bs);
	fflush(stdout);
	for (uint64_t b = 0; b < n; b++)
		expect[b] = writing ? seed - 1 : seed;
	do {
		uint64_t pass_seed = writing ? seed + passes : seed, failed = 0;
		for (uint64_t lba = 0; lba < n; lba++) {
			if (writing)
				fill(buf, bs, lba, pass_seed);
			ios++;
			if (io(fd, buf, bs, lba, writing)) {
				failed++;
				continue;
			}
			if (writing)
				expect[lba] = pass_seed;
			else if (check(buf, bs, lba, seed) >= 0)
				mismatches++;
		}
		if (writing && fdatasync(fd))
			failed++;
		ioerrs += failed;
		uint64_t moved = phys_addr(buf);
		printf("blkverify: pass=%" PRIu64 " seed=%" PRIu64 " ok=%" PRIu64 " failed=%" PRIu64
		       "%s\n", passes, pass_seed, n - failed, failed, moved != gpa ? " moved" : "");
		fflush(stdout);
		passes++;
	} while (!exists(stop));
	if (writing) {
		int listed = 0;
		printf("blkverify: stale=");
		for (uint64_t lba = 0; lba < n; lba++) {
			if (expect[lba] != seed + passes - 1) {
				printf("%s%" PRIu64 ":%" PRIu64, listed++ ? "," : "", lba, expect[lba]);
			}
			if (io(fd, buf, bs, lba, 0) || check(buf, bs, lba, expect[lba]) >= 0)
				mismatches++;
		}
		printf("%s\n", listed ? "" : "none");
	}
	printf("blkverify: mode=%s passes=%" PRIu64 " ios=%" PRIu64 " ioerrors=%" PRIu64
	       " mismatches=%ld result=%s\n", writing ? "live-write" : "live-read", passes, ios,
	       ioerrs, mismatches, mismatches ? "FAIL" : "PASS");
	free(expect);
	return mismatches ? 1 : 0;
}

static int bench(int fd, uint64_t *buf, size_t bs, uint64_t n, double seconds, int writing)
{
	uint64_t mask = 1, x = 1, ios = 0, errors = 0;
	while (mask < n)
		mask <<= 1;
	mask -= 1;
	if (writing)
		fill(buf, bs, 0, 0);
	double t0 = now(), t = t0;
	if (writing) {
		for (uint64_t lba = 0; lba < n; lba++, ios++)
			errors += io(fd, buf, bs, lba, 1) != 0;
		errors += fdatasync(fd) != 0;
		t = now();
	} else {
		while (t - t0 < seconds) {
			for (int k = 0; k < 64; k++, ios++) {
				do
					x = next_rand(x, mask);
				while (x >= n);
				errors += io(fd, buf, bs, x, 0) != 0;
			}
			t = now();
		}
	}
	double dt = t - t0;
	printf("blkverify: mode=%s bs=%zu ios=%" PRIu64 " seconds=%.3f iops=%.0f mbps=%.2f "
	       "ioerrors=%" PRIu64 " result=%s\n", writing ? "seqwrite" : "randread", bs, ios, dt,
	       ios / dt, ios * (double)bs / dt / 1e6, errors, errors ? "FAIL" : "PASS");
	return errors ? 1 : 0;
}

int main(int argc, char **argv)
{
	if (argc < 4) {
		fprintf(stderr, "usage: %s DEV write|read|verify|rw seq|rand NBLOCKS [SEED] [BS]\n"
			"       %s DEV live-write|live-read NBLOCKS SEED STOPFILE [BS]\n"
			"       %s DEV randread NBLOCKS SECONDS [BS]\n"
			"       %s DEV seqwrite NBLOCKS [BS]\n", argv[0], argv[0], argv[0], argv[0]);
		return 2;
	}
	const char *dev = argv[1], *mode = argv[2], *stop = NULL;
	int is_live = !strcmp(mode, "live-write") || !strcmp(mode, "live-read");
	int randread = !strcmp(mode, "randread"), seqwrite = !strcmp(mode, "seqwrite");
	int do_write = !strcmp(mode, "write") || !strcmp(mode, "rw") || seqwrite ||
		!strcmp(mode, "live-write");
	int do_read = !strcmp(mode, "read") || !strcmp(mode, "verify") || !strcmp(mode, "rw");
	/* positional arguments after DEV MODE, per mode: [first required, count] */
	int need = is_live ? 3 : randread ? 2 : seqwrite ? 1 : 2;
	if ((!is_live && !randread && !seqwrite && !do_write && !do_read) || argc < 3 + need) {
		fprintf(stderr, "%s: unknown mode or missing arguments (run without any)\n", argv[0]);
		return 2;
	}
	int rnd = 0, bs_arg;
	uint64_t n, seed = 1;
	double seconds = 0;
	if (is_live) {
		n = strtoull(argv[3], NULL, 0);
		seed = strtoull(argv[4], NULL, 0);
		stop = argv[5];
		bs_arg = 6;
	} else if (randread) {
		n = strtoull(argv[3], NULL, 0);
		seconds = strtod(argv[4], NULL);
		bs_arg = 5;
	} else if (seqwrite) {
		n = strtoull(argv[3], NULL, 0);
		bs_arg = 4;
	} else {
		rnd = !strcmp(argv[3], "rand");
		n = strtoull(argv[4], NULL, 0);
		if (argc > 5)
			seed = strtoull(argv[5], NULL, 0);
		bs_arg = 6;
	}
	size_t bs = argc > bs_arg ? strtoul(argv[bs_arg], NULL, 0) : 4096;
	if (n == 0 || bs == 0 || bs % 512) {
		fprintf(stderr, "%s: NBLOCKS > 0 and BS a multiple of 512, please\n", argv[0]);
		return 2;
	}

	int fd = open(dev, (do_write ? O_RDWR : O_RDONLY) | O_DIRECT);
	if (fd < 0) {
		perror(dev);
		return 2;
	}
	uint64_t size = 0;
	if (ioctl(fd, BLKGETSIZE64, &size) == 0 && n * bs > size) {
		fprintf(stderr, "%s: %" PRIu64 " blocks of %zu exceed %" PRIu64 " bytes\n", dev, n, bs,
			size);
		return 2;
	}
	uint64_t *buf;
	if (posix_memalign((void **)&buf, 4096, bs)) /* O_DIRECT: page-aligned buffer */
		return 2;
	memset(buf, 0, bs);
	mlock(buf, bs); /* the live modes name its guest-physical page */
	if (is_live)
		return live(fd, buf, bs, n, seed, stop, do_write);
	if (randread || seqwrite)
		return bench(fd, buf, bs, n, seconds, seqwrite);

	uint64_t mask = 1;
	while (mask < n)
		mask <<= 1;
	mask -= 1;
	long errors = 0, ioerrs = 0;
	double t0 = now();
	for (int pass = 0; pass < 2; pass++) {
		int writing = pass == 0;
		if ((writing && !do_write) || (!writing && !do_read))
			continue;
		uint64_t x = seed & mask;
		for (uint64_t k = 0; k < n; k++) {
			uint64_t lba = k;
			if (rnd) {
				do
					x = next_rand(x, mask);
				while (x >= n);
				lba = x;
			}
			if (writing)
				fill(buf, bs, lba, seed);
			else
				memset(buf, 0, bs);
			if (io(fd, buf, bs, lba, writing)) {
				if (ioerrs < 10)
					printf("blkverify: %s error lba=%" PRIu64 ": %s\n",
					       writing ? "write" : "read", lba, strerror(errno));
				ioerrs++;
				continue;
			}
			long bad = writing ? -1 : check(buf, bs, lba, seed);
			if (bad >= 0) {
				if (errors < 10)
					printf("blkverify: mismatch lba=%" PRIu64 " word=%ld got=%#" PRIx64
					       " want=%#" PRIx64 "\n", lba, bad, buf[bad],
					       word(lba, seed, bad));
				errors++;
			}
		}
		if (writing && fdatasync(fd))
			ioerrs++;
	}
	double dt = now() - t0;
	printf("blkverify: dev=%s mode=%s order=%s blocks=%" PRIu64 " bs=%zu seed=%" PRIu64
	       " ioerrors=%ld mismatches=%ld seconds=%.3f result=%s\n", dev, mode,
	       rnd ? "rand" : "seq", n, bs, seed, ioerrs, errors, dt,
	       (errors || ioerrs) ? "FAIL" : "PASS");
	return (errors || ioerrs) ? 1 : 0;
}
