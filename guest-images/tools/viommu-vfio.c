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
	return 0;
}

static int usage(void)
{
	fprintf(stderr, "usage: viommu-vfio bind BDF | map BDF IOVA SIZE [ro] [--until FILE] | "
			"maplat BDF COUNT\n");
	return 2;
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc >= 3 && !strcmp(argv[1], "bind"))
		return cmd_bind(argv[2]);
	if (argc >= 5 && !strcmp(argv[1], "map"))
		return cmd_map(argc - 2, argv + 2);
	if (argc >= 4 && !strcmp(argv[1], "maplat"))
		return cmd_maplat(argv[2], strtol(argv[3], NULL, 0));
	return usage();
}
