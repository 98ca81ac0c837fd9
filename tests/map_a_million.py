"""Map a million 4 KiB ranges through the data plane into one device, as a hostile guest
would, and print what happened and the process's peak resident memory (JSON).
Run as a script so the figure is this process's alone (tests/unit/test_limits.py)."""

import json
import re
import struct
import sys

from viommu.device.virtio_iommu import VirtioIommuDevice
from viommu.uapi import VIRTIO_F_VERSION_1, Feature, RequestType, Status
from virtio_driver import FakeDriver

EP = 0x100
BATCH = 256


def main(count: int) -> None:
    driver = FakeDriver(queue_size=BATCH, mem_size=4 << 20)
    device = VirtioIommuDevice([EP])
    device.driver_features = (1 << VIRTIO_F_VERSION_1) | (1 << Feature.F_MAP_UNMAP)
    statuses: dict[str, int] = {}
    tails = [driver.alloc(4) for _ in range(BATCH)]
    reqs = [driver.alloc(40) for _ in range(BATCH)]

    def submit(slot: int, body: bytes) -> None:
        driver.write(reqs[slot], body)
        driver.set_desc(2 * slot % BATCH, reqs[slot], len(body), 1, (2 * slot + 1) % BATCH)
        driver.set_desc((2 * slot + 1) % BATCH, tails[slot], 4, 2)
        driver.publish(2 * slot % BATCH)

    submit(0, struct.pack("<B3xIIII", RequestType.VIRTIO_IOMMU_T_ATTACH, 1, EP, 0, 0))
    driver.vq.process_requests(device.handle_request)
    driver.take_used()
    done = 0
    while done < count:
        n = min(BATCH // 2, count - done)
        for slot in range(n):
            iova = (done + slot) * 0x1000
            submit(slot, struct.pack("<B3xIQQQI", RequestType.VIRTIO_IOMMU_T_MAP, 1, iova,
                                     iova + 0xFFF, 0x100000, 3))
        driver.vq.process_requests(device.handle_request)
        driver.take_used()
        for slot in range(n):
            name = Status(driver.read(tails[slot], 1)[0]).name
            statuses[name] = statuses.get(name, 0) + 1
        done += n
    # VmHWM: this address space's peak RSS (ru_maxrss would include the forking parent's,
    # which Linux carries across execve).
    status = open("/proc/self/status").read()
    peak_kib = int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)[1])
    print(json.dumps({"statuses": statuses, "mappings": len(device.domains[1].mappings),
                      "maxrss_kib": peak_kib}))


if __name__ == "__main__":
    main(int(sys.argv[1]))
