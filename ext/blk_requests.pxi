# virtio-blk requests (virtio spec 5.2.6 "Device Operation") against a backing file, for a
# chain the block queue's walker gathered (blkq.pxi). Every byte the device reads or writes
# in guest memory goes through the translation engine (`Engine.translate_c`) with the
# endpoint's stream ID, split at each page and mapping end; the file is read and written
# with ordinary preadv/pwritev straight from and into the translated guest pages, and FLUSH
# is fdatasync.
#
# A chain is a device-readable byte stream followed by a device-writable one ("The device
# MUST NOT make assumptions about the particular arrangement of descriptors", spec 2.6.4
# "Message Framing"): the header is the first 16 readable bytes, the status the last
# writable byte, as QEMU's block/export/virtio-blk-handler.c reads them. A data access that
# does not translate stops the request with VIRTIO_BLK_S_IOERR and leaves an SMMUv3 event
# record for the relay; up to BLK_MAX_IOV pages of a request are translated before the
# file is touched, so a request up to that size transfers nothing when one of its pages
# faults.

from posix.types cimport off_t
from posix.uio cimport iovec, preadv, pwritev


cdef extern from "<fcntl.h>" nogil:
    int fallocate(int fd, int mode, off_t offset, off_t length)
    enum:
        FALLOC_FL_KEEP_SIZE
        FALLOC_FL_PUNCH_HOLE
        FALLOC_FL_ZERO_RANGE

cdef extern from "<unistd.h>" nogil:
    int fdatasync(int fd)

cdef extern from "<errno.h>" nogil:
    int errno
    enum:
        EINTR


cdef enum:
    BLK_MAX_IOV = 1024              # pieces per preadv/pwritev (Linux UIO_MAXIOV)
    BLK_MAX_FAULTS = 64             # fault records kept until Python takes them
    BLK_MAX_DISCARD_SEG = 16        # max_discard_seg / max_write_zeroes_seg offered
    BLK_ZERO_CHUNK = 65536

cdef uint8_t BLK_ZEROES[BLK_ZERO_CHUNK]  # what WRITE_ZEROES writes where fallocate cannot


cdef struct BlkSeg:                 # one descriptor's buffer
    uint64_t addr                   # IOVA
    uint32_t len


cdef struct BlkCounters:
    uint64_t requests, reads, writes, flushes, get_ids, discards, write_zeroes
    uint64_t unsupported, ioerrors, data_faults, host_errors, bytes_read, bytes_written


cdef struct BlkDevice:              # the backing file and what was negotiated
    int fd                          # the backing file (Python owns it)
    uint64_t capacity               # in 512-byte sectors
    bint read_only                  # VIRTIO_BLK_F_RO offered: writes fail
    bint discard, write_zeroes      # VIRTIO_BLK_F_DISCARD / _WRITE_ZEROES negotiated
    uint8_t serial[VIRTIO_BLK_ID_BYTES]
    int last_errno                  # the backing file's last error
    BlkCounters c


cdef struct BlkChain:               # the chain being served
    BlkSeg *segs
    unsigned int nseg, nread        # segs[0:nread] are readable, the rest writable
    uint64_t readable, writable     # byte counts of the two streams
    uint64_t written                # bytes written into the writable stream so far
    bint faulted                    # a data access did not translate


cdef struct BlkFaults:              # SMMUv3 faults waiting for the relay
    Fault f[BLK_MAX_FAULTS]
    unsigned int n
    uint64_t dropped


cdef void blk_note_fault(BlkFaults *faults, const Fault *f) noexcept nogil:
    if not f.recorded:
        return  # terminated without an event (STE.Config abort, CD.R = 0)
    if faults.n < BLK_MAX_FAULTS:
        faults.f[faults.n] = f[0]
        faults.n += 1
    else:
        faults.dropped += 1


# --- the two byte streams ----------------------------------------------------------------

cdef int blk_locate(const BlkChain *ch, bint writable, uint64_t pos, unsigned int *seg,
                    uint64_t *off) noexcept nogil:
    """The segment holding byte `pos` of a stream and the offset in it; -1 past the end."""
    cdef unsigned int i = ch.nread if writable else 0
    cdef unsigned int end = ch.nseg if writable else ch.nread
    while i < end:
        if pos < ch.segs[i].len:
            seg[0], off[0] = i, pos
            return 0
        pos -= ch.segs[i].len
        i += 1
    return -1


cdef int blk_copy(Engine e, uint32_t sid, BlkChain *ch, BlkFaults *faults, bint writable,
                  uint64_t pos, uint8_t *buf, uint64_t n) noexcept nogil:
    """Copy n bytes between `buf` and a stream at `pos`: into the writable stream, out of
    the readable one. -1 with the fault noted when an access does not translate."""
    cdef unsigned int i
    cdef uint64_t off, gpa, avail, chunk, done = 0
    cdef uint8_t *host
    cdef Fault f
    if n == 0:
        return 0
    if blk_locate(ch, writable, pos, &i, &off) != 0:
        return -1
    while done < n:
        if off == ch.segs[i].len:
            i += 1
            off = 0
            continue
        host = e.translate_c(sid, -1, ch.segs[i].addr + off, ACC_WRITE if writable else ACC_READ,
                             &gpa, &avail, &f)
        if host == NULL:
            blk_note_fault(faults, &f)
            ch.faulted = True
            return -1
        chunk = min(avail, ch.segs[i].len - off, n - done)
        if writable:
            memcpy(host, buf + done, chunk)
            ch.written += chunk
        else:
            memcpy(buf + done, host, chunk)
        done += chunk
        off += chunk
    return 0


cdef int blk_file_io(int fd, iovec *iov, int n, off_t pos, bint to_file) noexcept nogil:
    """preadv/pwritev until every byte moved; errno on failure or a short read (0: done)."""
    cdef ssize_t got
    cdef int first = 0
    while first < n:
        if to_file:
            got = pwritev(fd, iov + first, n - first, pos)
        else:
            got = preadv(fd, iov + first, n - first, pos)
        if got < 0:
            if errno == EINTR:
                continue
            return errno
        if got == 0:
            return 5  # EIO: the file ends before the device's capacity
        pos += got
        while first < n and <size_t>got >= iov[first].iov_len:
            got -= iov[first].iov_len
            first += 1
        if first < n:
            iov[first].iov_base = <uint8_t *>iov[first].iov_base + got
            iov[first].iov_len -= got
    return 0


cdef int blk_transfer(Engine e, uint32_t sid, BlkDevice *dev, BlkChain *ch, BlkFaults *faults,
                      iovec *iov, bint to_file, uint64_t pos, uint64_t n,
                      uint64_t file_pos) noexcept nogil:
    """Move n bytes between a stream at `pos` and the file at `file_pos`: the readable
    stream to the file (OUT), or the file to the writable stream (IN). Pages are translated
    BLK_MAX_IOV at a time before the file is touched. 0, -1 on a fault, -2 on a file error."""
    cdef unsigned int i
    cdef uint64_t off, gpa, avail, chunk, done = 0, batch = 0
    cdef int niov = 0, err
    cdef uint8_t *host
    cdef Fault f
    if n == 0:
        return 0
    if blk_locate(ch, not to_file, pos, &i, &off) != 0:
        return -2
    while done < n:
        if off == ch.segs[i].len:
            i += 1
            off = 0
            continue
        host = e.translate_c(sid, -1, ch.segs[i].addr + off, ACC_READ if to_file else ACC_WRITE,
                             &gpa, &avail, &f)
        if host == NULL:  # what was translated but not moved yet stays unmoved
            blk_note_fault(faults, &f)
            ch.faulted = True
            return -1
        chunk = min(avail, ch.segs[i].len - off, n - done)
        iov[niov].iov_base = host
        iov[niov].iov_len = chunk
        niov += 1
        done += chunk
        off += chunk
        batch += chunk
        if niov == BLK_MAX_IOV or done == n:
            err = blk_file_io(dev.fd, iov, niov, <off_t>(file_pos + done - batch), to_file)
            if err:
                dev.last_errno = err
                dev.c.host_errors += 1
                return -2
            if not to_file:
                ch.written += batch
            niov = 0
            batch = 0
    return 0


# --- requests --------------------------------------------------------------------------

cdef bint blk_range_ok(const BlkDevice *dev, uint64_t sector, uint64_t nbytes) noexcept nogil:
    """A whole number of sectors inside the capacity (QEMU virtio_blk_sect_range_ok)."""
    if nbytes % VIRTIO_BLK_SECTOR_SIZE:
        return False
    return sector <= dev.capacity and nbytes // VIRTIO_BLK_SECTOR_SIZE <= dev.capacity - sector


cdef uint8_t blk_rw(Engine e, uint32_t sid, BlkDevice *dev, BlkChain *ch, BlkFaults *faults,
                    iovec *iov, bint out, uint64_t sector) noexcept nogil:
    cdef uint64_t n = ch.readable - sizeof(virtio_blk_outhdr) if out else ch.writable - 1
    cdef uint64_t pos = sizeof(virtio_blk_outhdr) if out else 0
    if out and dev.read_only:
        return VIRTIO_BLK_S_IOERR  # spec 5.2.6.2: a write to a VIRTIO_BLK_F_RO device fails
    if not blk_range_ok(dev, sector, n):
        return VIRTIO_BLK_S_IOERR
    if blk_transfer(e, sid, dev, ch, faults, iov, out, pos, n,
                    sector * VIRTIO_BLK_SECTOR_SIZE) != 0:
        return VIRTIO_BLK_S_IOERR
    if out:
        dev.c.writes += 1
        dev.c.bytes_written += n
    else:
        dev.c.reads += 1
        dev.c.bytes_read += n
    return VIRTIO_BLK_S_OK


cdef uint8_t blk_discard(Engine e, uint32_t sid, BlkDevice *dev, BlkChain *ch,
                         BlkFaults *faults, bint zeroes) noexcept nogil:
    """DISCARD and WRITE_ZEROES: their segments are the data (spec 5.2.6). A discard is a
    hint (punched where the file system can); zeroes are zeroes, unmapped or written."""
    cdef virtio_blk_discard_write_zeroes segs[BLK_MAX_DISCARD_SEG]
    cdef uint64_t n = ch.readable - sizeof(virtio_blk_outhdr)
    cdef unsigned int k, count
    cdef uint64_t start, length, done, chunk
    cdef iovec zeroes_iov
    cdef int err
    if dev.read_only or n == 0 or n % sizeof(virtio_blk_discard_write_zeroes) or (
            n > sizeof(segs)):
        return VIRTIO_BLK_S_IOERR
    count = n // sizeof(virtio_blk_discard_write_zeroes)
    if blk_copy(e, sid, ch, faults, False, sizeof(virtio_blk_outhdr), <uint8_t *>segs, n) != 0:
        return VIRTIO_BLK_S_IOERR
    for k in range(count):
        if segs[k].flags & ~(<uint32_t>VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP) or (
                not zeroes and segs[k].flags):
            return VIRTIO_BLK_S_UNSUPP  # spec 5.2.6.2: unknown flags, or unmap on DISCARD
        if not blk_range_ok(dev, segs[k].sector,
                            <uint64_t>segs[k].num_sectors * VIRTIO_BLK_SECTOR_SIZE):
            return VIRTIO_BLK_S_IOERR
    for k in range(count):
        start = segs[k].sector * VIRTIO_BLK_SECTOR_SIZE
        length = <uint64_t>segs[k].num_sectors * VIRTIO_BLK_SECTOR_SIZE
        if length == 0:
            continue
        if not zeroes:
            fallocate(dev.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, start, length)
            continue
        if fallocate(dev.fd, (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)
                     if segs[k].flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
                     else FALLOC_FL_ZERO_RANGE, start, length) == 0:
            continue
        done = 0  # the file system cannot: write them
        while done < length:
            chunk = min(length - done, BLK_ZERO_CHUNK)
            zeroes_iov.iov_base = BLK_ZEROES
            zeroes_iov.iov_len = chunk
            err = blk_file_io(dev.fd, &zeroes_iov, 1, <off_t>(start + done), True)
            if err:  # (it writes on after a short write, and retries EINTR)
                dev.last_errno = err
                dev.c.host_errors += 1
                return VIRTIO_BLK_S_IOERR
            done += chunk
    if zeroes:
        dev.c.write_zeroes += 1
    else:
        dev.c.discards += 1
    return VIRTIO_BLK_S_OK


cdef uint8_t blk_execute(Engine e, uint32_t sid, BlkDevice *dev, BlkChain *ch,
                         BlkFaults *faults, iovec *iov) noexcept nogil:
    """Serve one request whose chain has a header and a status byte; its status."""
    cdef virtio_blk_outhdr hdr
    cdef uint64_t n
    dev.c.requests += 1
    if blk_copy(e, sid, ch, faults, False, 0, <uint8_t *>&hdr, sizeof(hdr)) != 0:
        return VIRTIO_BLK_S_IOERR
    if hdr.type == VIRTIO_BLK_T_IN or hdr.type == VIRTIO_BLK_T_OUT:
        return blk_rw(e, sid, dev, ch, faults, iov, hdr.type == VIRTIO_BLK_T_OUT, hdr.sector)
    if hdr.type == VIRTIO_BLK_T_FLUSH:
        dev.c.flushes += 1
        if fdatasync(dev.fd) != 0:
            dev.last_errno = errno
            dev.c.host_errors += 1
            return VIRTIO_BLK_S_IOERR
        return VIRTIO_BLK_S_OK
    if hdr.type == VIRTIO_BLK_T_GET_ID:
        dev.c.get_ids += 1
        n = min(ch.writable - 1, <uint64_t>VIRTIO_BLK_ID_BYTES)
        if blk_copy(e, sid, ch, faults, True, 0, dev.serial, n) != 0:
            return VIRTIO_BLK_S_IOERR
        return VIRTIO_BLK_S_OK
    if hdr.type == VIRTIO_BLK_T_DISCARD and dev.discard:
        return blk_discard(e, sid, dev, ch, faults, False)
    if hdr.type == VIRTIO_BLK_T_WRITE_ZEROES and dev.write_zeroes:
        return blk_discard(e, sid, dev, ch, faults, True)
    dev.c.unsupported += 1
    return VIRTIO_BLK_S_UNSUPP
