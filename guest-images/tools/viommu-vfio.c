/*
 * viommu-vfio: drive an endpoint from the test guest through VFIO.
 *
 * Binding the endpoint to vfio-pci and mapping buffers with VFIO_IOMMU_MAP_DMA makes the
 * guest kernel send virtio-iommu ATTACH/MAP/UNMAP requests to the viommu backend: this is
 * how a test gets real guest requests and, with a DMA endpoint, real guest DMA.
 *
 * Output lines start with "viommu-vfio:" followed by key=value pairs, for the controller.
 *
 *   viommu-vfio bind BDF                     bind BDF (0000:01:00.0) to vfio-pci
 *   viommu-vfio map BDF IOVA SIZE [ro] [--until FILE]
 *                                            map SIZE bytes at IOVA, wait until FILE exists
 *                                            (or return at once), unmap
 *   viommu-vfio maplat BDF COUNT             map+unmap 4 KiB COUNT times, print medians
 *                                            and percentiles 0..100
 *   viommu-vfio dma BDF SRC DST LEN [src=rw|ro|none] [dst=rw|ro|none] [pasid=N]
 *                   [--steps N] [--wait PREFIX] [--repeat N]
 *                                            run the DMA endpoint's copy SRC -> DST: map the
 *                                            buffers (src filled with a pattern; "none" leaves
 *                                            an IOVA unmapped), ring the doorbell, report the
 *                                            status, the fault and whether DST got the pattern;
 *                                            --steps N transfers, each after PREFIX.STEP exists
 *                                            when --wait is given
 *
 * DMA endpoint BAR0 registers: controller/endpoint.py.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <linux/vfio.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL

static void die(const char *what)
{
	printf("viommu-vfio: error=%d what=\"%s: %s\"\n", errno, what, strerror(errno));
	exit(1);
}

static int write_sysfs(const char *path, const char *value)
{
	int fd = open(path, O_WRONLY);
	if (fd < 0)
		return -1;
	ssize_t n = write(fd, value, strlen(value));
	close(fd);
	return n < 0 ? -1 : 0;
}

static int iommu_group(const char *bdf)
{
	char link[256], target[256];
	snprintf(link, sizeof(link), "/sys/bus/pci/devices/%s/iommu_group", bdf);
	ssize_t n = readlink(link, target, sizeof(target) - 1);
	if (n < 0)
		die("no IOMMU group for the device");
	target[n] = 0;
	return atoi(basename(target));
}

static int cmd_bind(const char *bdf)
{
	char path[256];
	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/driver_override", bdf);
	if (write_sysfs(path, "vfio-pci"))
		die("driver_override");
	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/driver/unbind", bdf);
	write_sysfs(path, bdf); /* fails harmlessly when no driver is bound */
	if (write_sysfs("/sys/bus/pci/drivers_probe", bdf))
		die("drivers_probe");
	printf("viommu-vfio: bound=%s group=%d\n", bdf, iommu_group(bdf));
	return 0;
}

/* The device's VFIO group; a group can be opened only once. */
static int group_fd = -1;

/* A type1 container holding the device's group: from here on, MAP_DMA is an IOMMU map. */
static int open_container(const char *bdf)
{
	char path[64];
	int container = open("/dev/vfio/vfio", O_RDWR);
	if (container < 0)
		die("open /dev/vfio/vfio");
	if (ioctl(container, VFIO_GET_API_VERSION) != VFIO_API_VERSION)
		die("VFIO API version");
	if (!ioctl(container, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU))
		die("no VFIO type1v2 IOMMU");
	snprintf(path, sizeof(path), "/dev/vfio/%d", iommu_group(bdf));
	int group = open(path, O_RDWR);
	if (group < 0)
		die("open the VFIO group (is the device bound to vfio-pci?)");
	struct vfio_group_status status = { .argsz = sizeof(status) };
	if (ioctl(group, VFIO_GROUP_GET_STATUS, &status) || !(status.flags & VFIO_GROUP_FLAGS_VIABLE))
		die("VFIO group not viable");
	if (ioctl(group, VFIO_GROUP_SET_CONTAINER, &container))
		die("VFIO_GROUP_SET_CONTAINER");
	if (ioctl(container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU))
		die("VFIO_SET_IOMMU");
	group_fd = group;
	return container;
}

static int dma_map(int container, void *vaddr, uint64_t iova, uint64_t size, int readonly)
{
	struct vfio_iommu_type1_dma_map map = {
		.argsz = sizeof(map),
		.flags = VFIO_DMA_MAP_FLAG_READ | (readonly ? 0 : VFIO_DMA_MAP_FLAG_WRITE),
		.vaddr = (uintptr_t)vaddr,
		.iova = iova,
		.size = size,
	};
	return ioctl(container, VFIO_IOMMU_MAP_DMA, &map);
}

static int dma_unmap(int container, uint64_t iova, uint64_t size)
{
	struct vfio_iommu_type1_dma_unmap unmap = {
		.argsz = sizeof(unmap), .iova = iova, .size = size,
	};
	return ioctl(container, VFIO_IOMMU_UNMAP_DMA, &unmap);
}

static void *buffer(uint64_t size)
{
	void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		die("mmap");
	memset(p, 0, size); /* fault the pages in: VFIO pins them */
	return p;
}

static int cmd_map(int argc, char **argv)
{
	const char *bdf = argv[0], *until = NULL;
	uint64_t iova = strtoull(argv[1], NULL, 0), size = strtoull(argv[2], NULL, 0);
	int readonly = 0;
	for (int i = 3; i < argc; i++) {
		if (!strcmp(argv[i], "ro"))
			readonly = 1;
		else if (!strcmp(argv[i], "--until") && i + 1 < argc)
			until = argv[++i];
	}
	int container = open_container(bdf);
	if (dma_map(container, buffer(size), iova, size, readonly))
		die("VFIO_IOMMU_MAP_DMA");
	printf("viommu-vfio: mapped iova=%#llx size=%#llx ro=%d\n",
	       (unsigned long long)iova, (unsigned long long)size, readonly);
	fflush(stdout);
	struct stat st;
	while (until && stat(until, &st))
		usleep(20000);
	if (dma_unmap(container, iova, size))
		die("VFIO_IOMMU_UNMAP_DMA");
	printf("viommu-vfio: unmapped iova=%#llx\n", (unsigned long long)iova);
	return 0;
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000000ULL + ts.tv_nsec;
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

/* The distribution of sorted samples: percentiles 0 to 100, one line. */
static void print_percentiles(const char *name, const uint64_t *sorted, long count)
{
	printf("viommu-vfio: %s_percentiles_ns=", name);
	for (int p = 0; p <= 100; p++)
		printf("%s%llu", p ? "," : "", (unsigned long long)sorted[(count - 1) * p / 100]);
	printf("\n");
}

static int cmd_maplat(const char *bdf, long count)
{
	if (count < 1)
		count = 1;
	int container = open_container(bdf);
	void *buf = buffer(PAGE);
	uint64_t *map_ns = calloc(count, sizeof(*map_ns)), *unmap_ns = calloc(count, sizeof(*unmap_ns));
	for (long i = 0; i < count; i++) {
		uint64_t t0 = now_ns();
		if (dma_map(container, buf, 0x100000, PAGE, 0))
			die("VFIO_IOMMU_MAP_DMA");
		uint64_t t1 = now_ns();
		if (dma_unmap(container, 0x100000, PAGE))
			die("VFIO_IOMMU_UNMAP_DMA");
		map_ns[i] = t1 - t0;
		unmap_ns[i] = now_ns() - t1;
	}
	qsort(map_ns, count, sizeof(*map_ns), cmp_u64);
	qsort(unmap_ns, count, sizeof(*unmap_ns), cmp_u64);
	printf("viommu-vfio: maplat count=%ld map_median_ns=%llu unmap_median_ns=%llu\n", count,
	       (unsigned long long)map_ns[count / 2], (unsigned long long)unmap_ns[count / 2]);
	print_percentiles("map", map_ns, count);
	print_percentiles("unmap", unmap_ns, count);
	return 0;
}

/* BAR0 of the DMA endpoint (controller/endpoint.py) */
enum {
	REG_ID = 0x00, REG_SRC = 0x08, REG_DST = 0x10, REG_LEN = 0x18, REG_PASID = 0x1c,
	REG_DOORBELL = 0x20, REG_STATUS = 0x24, REG_ERROR = 0x28, REG_COMPLETIONS = 0x2c,
	REG_FAULT_ADDR = 0x30, REG_BYTES_DONE = 0x38,
};
#define DMA_ENDPOINT_ID 0x414d4456u
#define PASID_VALID (1u << 31)
static const char *status_names[] = { "idle", "busy", "done", "error" };

struct endpoint {
	int fd;
	uint64_t bar0, config;
};

/* Call after open_container(): the device fd comes from the group in the container. */
static struct endpoint open_endpoint(const char *bdf)
{
	struct endpoint ep = { .fd = -1 };
	ep.fd = ioctl(group_fd, VFIO_GROUP_GET_DEVICE_FD, bdf);
	if (ep.fd < 0)
		die("VFIO_GROUP_GET_DEVICE_FD");
	struct vfio_region_info bar = { .argsz = sizeof(bar), .index = VFIO_PCI_BAR0_REGION_INDEX };
	struct vfio_region_info cfg = { .argsz = sizeof(cfg), .index = VFIO_PCI_CONFIG_REGION_INDEX };
	if (ioctl(ep.fd, VFIO_DEVICE_GET_REGION_INFO, &bar) ||
	    ioctl(ep.fd, VFIO_DEVICE_GET_REGION_INFO, &cfg))
		die("VFIO_DEVICE_GET_REGION_INFO");
	ep.bar0 = bar.offset;
	ep.config = cfg.offset;
	return ep;
}

static uint32_t reg_read32(struct endpoint *ep, unsigned off)
{
	uint32_t v = 0;
	if (pread(ep->fd, &v, 4, ep->bar0 + off) != 4)
		die("BAR0 read");
	return v;
}

static uint64_t reg_read64(struct endpoint *ep, unsigned off)
{
	uint64_t v = 0;
	if (pread(ep->fd, &v, 8, ep->bar0 + off) != 8)
		die("BAR0 read");
	return v;
}

static void reg_write(struct endpoint *ep, unsigned off, const void *v, size_t n)
{
	if (pwrite(ep->fd, v, n, ep->bar0 + off) != (ssize_t)n)
		die("BAR0 write");
}

/* DMA needs Bus Master Enable, as on hardware; vfio-pci leaves it to the user. */
static void enable_bus_master(struct endpoint *ep)
{
	uint16_t cmd;
	if (pread(ep->fd, &cmd, 2, ep->config + 4) != 2)
		die("config read");
	cmd |= 0x4;
	if (pwrite(ep->fd, &cmd, 2, ep->config + 4) != 2)
		die("config write");
}

static int enable_msi(struct endpoint *ep)
{
	int efd = eventfd(0, EFD_NONBLOCK);
	char buf[sizeof(struct vfio_irq_set) + sizeof(int)];
	struct vfio_irq_set *set = (struct vfio_irq_set *)buf;
	*set = (struct vfio_irq_set){
		.argsz = sizeof(buf), .index = VFIO_PCI_MSI_IRQ_INDEX, .start = 0, .count = 1,
		.flags = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
	};
	memcpy(set->data, &efd, sizeof(int));
	if (efd < 0)
		die("eventfd");
	if (ioctl(ep->fd, VFIO_DEVICE_SET_IRQS, set)) {
		/* Some kernels refuse a VFIO user MSI behind a virtio-iommu (arm64 7.x: ENOSPC).
		 * The DMA still works: the status register says when a transfer is done. */
		printf("viommu-vfio: msi=unavailable errno=%d what=\"%s\"\n", errno, strerror(errno));
		close(efd);
		return -1;
	}
	return efd;
}

static int wait_irq(int efd)
{
	struct pollfd p = { .fd = efd, .events = POLLIN };
	uint64_t count = 0;
	if (poll(&p, 1, 2000) == 1 && read(efd, &count, 8) == 8)
		return (int)count;
	return 0;
}

/* "rw" (default), "ro" or "none": how a buffer is mapped for the device. */
static int parse_map(const char *arg, const char *key, int *mode)
{
	size_t n = strlen(key);
	if (strncmp(arg, key, n) || arg[n] != '=')
		return 0;
	const char *v = arg + n + 1;
	*mode = !strcmp(v, "none") ? -1 : !strcmp(v, "ro") ? 1 : 0;
	return 1;
}

static void map_buffer(int container, void *buf, uint64_t iova, uint64_t len, int mode)
{
	uint64_t size = (len + PAGE - 1) & ~(PAGE - 1);
	if (mode >= 0 && dma_map(container, buf, iova, size, mode == 1))
		die("VFIO_IOMMU_MAP_DMA");
}

/* One transfer (or `repeat` back to back): wait for PREFIX.STEP if asked, ring, report. */
static int run_transfer(struct endpoint *ep, int efd, long step, const char *wait_prefix,
			long repeat, const uint8_t *sbuf, uint8_t *dbuf, uint32_t len, int dst_mode)
{
	if (wait_prefix) {
		char path[256];
		struct stat st;
		snprintf(path, sizeof(path), "%s.%ld", wait_prefix, step);
		printf("viommu-vfio: dma ready step=%ld\n", step);
		while (stat(path, &st))
			usleep(20000);
	}
	if (dst_mode == 0)
		memset(dbuf, 0, len);
	uint32_t one = 1, status = 0;
	uint64_t t0 = now_ns();
	for (long r = 0; r < repeat; r++) {
		reg_write(ep, REG_DOORBELL, &one, 4);
		status = reg_read32(ep, REG_STATUS);
		/* BUSY: the transfer waits for a PRI page response (up to 20 s) */
		for (int waited = 0; status == 1 && waited < 20000; waited++) {
			usleep(1000);
			status = reg_read32(ep, REG_STATUS);
		}
		if (status != 2)
			break;
	}
	uint64_t elapsed = now_ns() - t0;
	int irqs = efd >= 0 ? wait_irq(efd) : 0;
	uint32_t error = reg_read32(ep, REG_ERROR), done = reg_read32(ep, REG_BYTES_DONE);
	uint64_t fault = reg_read64(ep, REG_FAULT_ADDR);
	int verify = dst_mode == 0 && memcmp(sbuf, dbuf, len) == 0;
	printf("viommu-vfio: dma step=%ld status=%s error=%#x fault_addr=%#llx bytes=%u verify=%s "
	       "irq=%d msi=%s repeat=%ld ns=%llu\n", step, status < 4 ? status_names[status] : "?",
	       error, (unsigned long long)fault, done,
	       dst_mode != 0 ? "n/a" : verify ? "ok" : "mismatch", irqs,
	       efd >= 0 ? "ok" : "unavailable", repeat, (unsigned long long)elapsed);
	return status != 2;
}

static int cmd_dma(int argc, char **argv)
{
	const char *bdf = argv[0], *wait_prefix = NULL;
	uint64_t src = strtoull(argv[1], NULL, 0), dst = strtoull(argv[2], NULL, 0);
	uint32_t len = strtoul(argv[3], NULL, 0), pasid = 0;
	int src_mode = 0, dst_mode = 0;
	long repeat = 1, steps = 1;
	for (int i = 4; i < argc; i++) {
		if (parse_map(argv[i], "src", &src_mode) || parse_map(argv[i], "dst", &dst_mode))
			continue;
		if (!strncmp(argv[i], "pasid=", 6))
			pasid = PASID_VALID | strtoul(argv[i] + 6, NULL, 0);
		else if (!strcmp(argv[i], "--wait") && i + 1 < argc)
			wait_prefix = argv[++i];
		else if (!strcmp(argv[i], "--steps") && i + 1 < argc)
			steps = strtol(argv[++i], NULL, 0);
		else if (!strcmp(argv[i], "--repeat") && i + 1 < argc)
			repeat = strtol(argv[++i], NULL, 0);
	}
	uint64_t size = ((uint64_t)len + PAGE - 1) & ~(PAGE - 1);
	int container = open_container(bdf);
	struct endpoint ep = open_endpoint(bdf);
	if (reg_read32(&ep, REG_ID) != DMA_ENDPOINT_ID)
		die("not the viommu DMA endpoint (BAR0 ID mismatch)");
	uint8_t *sbuf = buffer(size), *dbuf = buffer(size);
	for (uint64_t i = 0; i < size; i++)
		sbuf[i] = (uint8_t)(i * 7 + 3);
	map_buffer(container, sbuf, src, len, src_mode);
	map_buffer(container, dbuf, dst, len, dst_mode);
	enable_bus_master(&ep);
	int efd = enable_msi(&ep);
	reg_write(&ep, REG_SRC, &src, 8);
	reg_write(&ep, REG_DST, &dst, 8);
	reg_write(&ep, REG_LEN, &len, 4);
	reg_write(&ep, REG_PASID, &pasid, 4);
	int failed = 0;
	for (long step = 1; step <= steps; step++)
		failed |= run_transfer(&ep, efd, step, wait_prefix, repeat, sbuf, dbuf, len, dst_mode);
	return failed ? 3 : 0;
}

static int usage(void)
{
	fprintf(stderr, "usage: viommu-vfio bind BDF | map BDF IOVA SIZE [ro] [--until FILE] | "
			"maplat BDF COUNT | dma BDF SRC DST LEN [src=rw|ro|none] "
			"[dst=rw|ro|none] [pasid=N] [--steps N] [--wait PREFIX] [--repeat N]\n");
	return 2;
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc >= 3 && !strcmp(argv[1], "bind"))
		return cmd_bind(argv[2]);
	if (argc >= 5 && !strcmp(argv[1], "map"))
		return cmd_map(argc - 2, argv + 2);
	if (argc >= 6 && !strcmp(argv[1], "dma"))
		return cmd_dma(argc - 2, argv + 2);
	if (argc >= 4 && !strcmp(argv[1], "maplat"))
		return cmd_maplat(argv[2], strtol(argv[3], NULL, 0));
	return usage();
}
