// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// The Host backend: CPU memory with the CUDA VMM path's semantics.
//
//  * Reserve  = mmap(PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE),
//               over-reserved by one granule and trimmed so it is aligned.
//  * Create   = a range of ONE memfd, bump-allocated and never reused, so any
//               number of handles costs one file descriptor and the handle id
//               encodes the offset. No syscall: pages are populated on first
//               touch, like tmpfs always does.
//  * Destroy  = fallocate(PUNCH_HOLE | KEEP_SIZE) of the range, which gives
//               the pages back to the OS.
//  * Map      = mmap(MAP_SHARED | MAP_FIXED) of the handle's range; a handle
//               mapped at two addresses is shared memory, so aliasing works.
//  * Unmap    = mmap(PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED) over
//               the range, so it stays reserved (never a hole another mmap
//               could take).
//  * Release  = munmap.
//
// With HostBackendOptions::exportable_handles, Create makes one memfd per
// handle instead ("vattn-export", sized to the handle), Destroy closes it
// (no punch: a peer that imported it may still map it; the kernel frees the
// pages when the last descriptor and mapping are gone) and Map maps it from
// offset 0. ExportHandle dup()s that descriptor; ImportHandle keeps a dup()
// of a peer's. Such handles carry kFileHandleBit, so they never collide with
// the shared memfd's offset-encoded handles.

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/match.h"
#include "absl/strings/str_format.h"
#include "src/internal/mutex.h"
#include "vattn/backend.h"
#include "vattn/status.h"

namespace vattn {
namespace {

using internal::Mutex;
using internal::MutexLock;

// The memfd's size. It is sparse (holds no memory until touched) and offsets
// are never reused, so this bounds the bytes ever created over the backend's
// life: 1 PiB is 2^29 handles of 2 MiB.
constexpr std::uint64_t kFileBytes = std::uint64_t{1} << 50;

// Handles that are a memfd of their own (exportable or imported).
constexpr PhysicalHandle kFileHandleBit = PhysicalHandle{1} << 63;
// The name every exportable memfd carries; ImportHandle accepts only these
// (readlink of /proc/self/fd/N reads "/memfd:vattn-export (deleted)").
constexpr char kExportName[] = "vattn-export";
constexpr char kExportLink[] = "/memfd:vattn-export";

// strerror_r comes in a GNU flavour (returns char*) and an XSI one (returns
// int); these overloads accept either.
[[maybe_unused]] std::string StrErrorResult(const char* result,
                                            const char* /*buf*/) {
  return result;
}
[[maybe_unused]] std::string StrErrorResult(int result, const char* buf) {
  return result == 0 ? std::string(buf) : std::string("unknown error");
}
std::string ErrnoText(int err) {
  char buf[128] = {};
  return StrErrorResult(strerror_r(err, buf, sizeof(buf)), buf);
}

// An OS call's failure as a Status: ENOMEM is ResourceExhausted (out of
// memory or address space), anything else Internal.
absl::Status ErrnoStatus(int err, const char* call, const std::string& what,
                         const char* file, int line) {
  std::string message =
      absl::StrFormat("%s failed: %s (errno %d) during %s at %s:%d (backend "
                      "host)",
                      call, ErrnoText(err), err, what, file, line);
  if (err == ENOMEM) return absl::ResourceExhaustedError(std::move(message));
  if (err == EMFILE || err == ENFILE) {
    // One descriptor per exportable handle: the process ran out of them.
    return absl::ResourceExhaustedError(
        std::move(message) +
        " (out of file descriptors: raise RLIMIT_NOFILE, ulimit -n)");
  }
  return absl::InternalError(std::move(message));
}
#define VATTN_ERRNO_STATUS(err, call, what) \
  ErrnoStatus((err), (call), (what), __FILE__, __LINE__)

void* AsPointer(DevicePtr va) { return reinterpret_cast<void*>(va); }
DevicePtr AsDevicePtr(void* p) { return reinterpret_cast<DevicePtr>(p); }

bool IsPowerOfTwo(std::size_t x) { return x != 0 && (x & (x - 1)) == 0; }

class HostBackend final : public Backend {
 public:
  HostBackend(BackendCapabilities caps, int fd, std::size_t limit)
      : Backend(std::move(caps)),
        fd_(fd),
        granularity_(capabilities().granularity),
        limit_(limit),
        per_handle_files_(capabilities().exportable) {}

  ~HostBackend() override {
    ReleaseAllForShutdown();
    ::close(fd_);
  }

 protected:
  absl::StatusOr<DevicePtr> DoReserve(std::size_t bytes) override {
    const std::size_t page = PageSize();
    // Over-reserve so an aligned start exists inside, then trim both ends.
    const std::size_t slack = granularity_ > page ? granularity_ : 0;
    const std::size_t total = bytes + slack;
    void* p = ::mmap(nullptr, total, PROT_NONE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
      return VATTN_ERRNO_STATUS(
          errno, "mmap(PROT_NONE)",
          absl::StrFormat("Reserve of %d bytes", bytes));
    }
    const DevicePtr raw = AsDevicePtr(p);
    const DevicePtr start = (raw + granularity_ - 1) & ~(granularity_ - 1);
    const std::size_t head = start - raw;
    const std::size_t tail = total - head - bytes;
    // munmap of a part of our own fresh mapping cannot fail short of a
    // kernel bug; a leftover would only be unused PROT_NONE address space.
    if (head != 0) (void)::munmap(p, head);
    if (tail != 0) (void)::munmap(AsPointer(start + bytes), tail);
    return start;
  }

  absl::Status DoRelease(DevicePtr va, std::size_t bytes) override {
    if (::munmap(AsPointer(va), bytes) != 0) {
      return VATTN_ERRNO_STATUS(
          errno, "munmap",
          absl::StrFormat("Release of 0x%x + %d", va, bytes));
    }
    return absl::OkStatus();
  }

  absl::StatusOr<PhysicalHandle> DoCreate(std::size_t bytes) override {
    MutexLock lock(&mu_);
    if (bytes > limit_ || used_ > limit_ - bytes) {
      return absl::ResourceExhaustedError(absl::StrFormat(
          "Create: %d bytes would exceed physical_limit_bytes %d (%d bytes "
          "in use) (backend host)",
          bytes, limit_, used_));
    }
    if (per_handle_files_) {
      const int fd = ::memfd_create(kExportName, MFD_CLOEXEC);
      if (fd < 0) {
        return VATTN_ERRNO_STATUS(
            errno, "memfd_create",
            absl::StrFormat("Create of an exportable %d-byte handle", bytes));
      }
      if (::ftruncate(fd, static_cast<off_t>(bytes)) != 0) {
        const int err = errno;
        ::close(fd);
        return VATTN_ERRNO_STATUS(
            err, "ftruncate",
            absl::StrFormat("Create of an exportable %d-byte handle", bytes));
      }
      used_ += bytes;
      return AddFileLocked(fd, /*imported=*/false);
    }
    if (bytes > kFileBytes - next_offset_) {
      return absl::ResourceExhaustedError(absl::StrFormat(
          "Create: the backend's memfd offsets are used up (%d bytes created "
          "over its life, never reused; make a new backend) (backend host)",
          next_offset_));
    }
    const PhysicalHandle handle = next_offset_ / granularity_ + 1;
    next_offset_ += bytes;
    used_ += bytes;
    return handle;
  }

  absl::Status DoDestroy(PhysicalHandle handle, std::size_t bytes) override {
    if ((handle & kFileHandleBit) != 0) {
      MutexLock lock(&mu_);
      auto it = files_.find(handle);
      if (it == files_.end()) {
        return absl::InternalError(absl::StrFormat(
            "Destroy: handle %d has no memfd (backend host)", handle));
      }
      // The descriptor is gone whatever close() says (Linux releases it
      // even on EINTR/EIO): nothing to retry, so the handle goes too.
      (void)::close(it->second.fd);
      if (!it->second.imported) used_ -= bytes;
      files_.erase(it);
      return absl::OkStatus();
    }
    if (::fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                    Offset(handle), static_cast<off_t>(bytes)) != 0) {
      return VATTN_ERRNO_STATUS(
          errno, "fallocate(PUNCH_HOLE)",
          absl::StrFormat("Destroy of handle %d (%d bytes)", handle, bytes));
    }
    MutexLock lock(&mu_);
    used_ -= bytes;
    return absl::OkStatus();
  }

  absl::Status DoMap(DevicePtr va, PhysicalHandle handle, std::size_t bytes,
                     MapAccess access) override {
    int fd = fd_;
    off_t offset = 0;
    if ((handle & kFileHandleBit) != 0) {
      VATTN_ASSIGN_OR_RETURN(fd, FileOf("Map", handle));
    } else {
      offset = Offset(handle);
    }
    void* p = ::mmap(AsPointer(va), bytes, Protection(access),
                     MAP_SHARED | MAP_FIXED, fd, offset);
    if (p == MAP_FAILED) {
      const int err = errno;
      // A failed MAP_FIXED may already have removed the old mapping; put the
      // reservation back so the range is never a hole.
      (void)Reprotect(va, bytes);
      std::string what = absl::StrFormat("Map of handle %d at 0x%x + %d",
                                         handle, va, bytes);
      if (err == ENOMEM) {
        what += " (out of memory, or of vm.max_map_count mappings)";
      }
      return VATTN_ERRNO_STATUS(err, "mmap(MAP_SHARED | MAP_FIXED)", what);
    }
    return absl::OkStatus();
  }

  absl::StatusOr<int> DoExportHandle(PhysicalHandle handle,
                                     std::size_t bytes) override {
    if ((handle & kFileHandleBit) == 0) {
      return absl::UnimplementedError(absl::StrFormat(
          "ExportHandle: handle %d is a range of the shared memfd, made "
          "before exportable_handles (backend host)",
          handle));
    }
    VATTN_ASSIGN_OR_RETURN(const int fd, FileOf("ExportHandle", handle));
    const int copy = ::fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (copy < 0) {
      return VATTN_ERRNO_STATUS(
          errno, "fcntl(F_DUPFD_CLOEXEC)",
          absl::StrFormat("ExportHandle of handle %d (%d bytes)", handle,
                          bytes));
    }
    return copy;
  }

  absl::StatusOr<PhysicalHandle> DoImportHandle(int fd,
                                                std::size_t bytes) override {
    if (::fcntl(fd, F_GETFD) < 0) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "ImportHandle: file descriptor %d is not open (%s) (backend host)",
          fd, ErrnoText(errno)));
    }
    // Only another Host backend's export: a memfd named vattn-export.
    const std::string path = absl::StrFormat("/proc/self/fd/%d", fd);
    char target[256] = {};
    const ssize_t n = ::readlink(path.c_str(), target, sizeof(target) - 1);
    if (n < 0) {
      return VATTN_ERRNO_STATUS(
          errno, "readlink",
          absl::StrFormat("ImportHandle of file descriptor %d", fd));
    }
    const std::string link(target, static_cast<std::size_t>(n));
    if (!absl::StartsWith(link, kExportLink) ||
        (link.size() > sizeof(kExportLink) - 1 &&
         link[sizeof(kExportLink) - 1] != ' ')) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "ImportHandle: file descriptor %d is \"%s\", not a vattn export "
          "(\"%s\", made by a Host backend with exportable_handles) "
          "(backend host)",
          fd, link, kExportLink));
    }
    struct stat st = {};
    if (::fstat(fd, &st) != 0) {
      return VATTN_ERRNO_STATUS(
          errno, "fstat",
          absl::StrFormat("ImportHandle of file descriptor %d", fd));
    }
    if (static_cast<std::uint64_t>(st.st_size) != bytes) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "ImportHandle: file descriptor %d holds %d bytes, not the %d "
          "expected (backend host)",
          fd, static_cast<std::int64_t>(st.st_size), bytes));
    }
    const int copy = ::fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (copy < 0) {
      return VATTN_ERRNO_STATUS(
          errno, "fcntl(F_DUPFD_CLOEXEC)",
          absl::StrFormat("ImportHandle of file descriptor %d", fd));
    }
    MutexLock lock(&mu_);
    return AddFileLocked(copy, /*imported=*/true);
  }

  absl::Status DoSetAccess(DevicePtr va, std::size_t bytes,
                           MapAccess access) override {
    if (::mprotect(AsPointer(va), bytes, Protection(access)) != 0) {
      return VATTN_ERRNO_STATUS(
          errno, "mprotect",
          absl::StrFormat("SetAccess of 0x%x + %d to %s", va, bytes,
                          access == MapAccess::kReadOnly ? "read-only"
                                                         : "read-write"));
    }
    return absl::OkStatus();
  }

  absl::Status DoCopyDeviceToDevice(DevicePtr dst, DevicePtr src,
                                    std::size_t bytes, Stream) override {
    std::memcpy(AsPointer(dst), AsPointer(src), bytes);
    return absl::OkStatus();
  }

  absl::Status DoUnmap(DevicePtr va, std::size_t bytes) override {
    if (!Reprotect(va, bytes)) {
      return VATTN_ERRNO_STATUS(
          errno, "mmap(PROT_NONE | MAP_FIXED)",
          absl::StrFormat("Unmap of 0x%x + %d", va, bytes));
    }
    return absl::OkStatus();
  }

  absl::Status DoZero(DevicePtr va, std::size_t bytes) override {
    std::memset(AsPointer(va), 0, bytes);
    return absl::OkStatus();
  }

  absl::Status DoCopyToDevice(DevicePtr dst, const void* src,
                              std::size_t bytes) override {
    std::memcpy(AsPointer(dst), src, bytes);
    return absl::OkStatus();
  }

  absl::Status DoCopyFromDevice(void* dst, DevicePtr src,
                                std::size_t bytes) override {
    std::memcpy(dst, AsPointer(src), bytes);
    return absl::OkStatus();
  }

 private:
  static std::size_t PageSize() {
    return static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
  }

  // A memfd of its own becomes a handle (mu_ held).
  PhysicalHandle AddFileLocked(int fd, bool imported)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    const PhysicalHandle handle = kFileHandleBit | ++next_file_;
    files_[handle] = File{fd, imported};
    return handle;
  }

  absl::StatusOr<int> FileOf(const char* what, PhysicalHandle handle) {
    MutexLock lock(&mu_);
    auto it = files_.find(handle);
    if (it == files_.end()) {
      return absl::InternalError(absl::StrFormat(
          "%s: handle %d has no memfd (backend host)", what, handle));
    }
    return it->second.fd;
  }

  static int Protection(MapAccess access) {
    return access == MapAccess::kReadOnly ? PROT_READ : PROT_READ | PROT_WRITE;
  }

  off_t Offset(PhysicalHandle handle) const {
    return static_cast<off_t>((handle - 1) * granularity_);
  }

  // Replaces whatever is at [va, va + bytes) by reserved, inaccessible
  // address space. False (errno set) on failure.
  static bool Reprotect(DevicePtr va, std::size_t bytes) {
    return ::mmap(AsPointer(va), bytes, PROT_NONE,
                  MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1,
                  0) != MAP_FAILED;
  }

  struct File {
    int fd = -1;
    bool imported = false;  // Another process's memory: not in used_.
  };

  // Constant after construction.
  const int fd_;
  const std::size_t granularity_;
  const std::size_t limit_;
  const bool per_handle_files_;  // exportable_handles.

  Mutex mu_;
  std::uint64_t next_offset_ ABSL_GUARDED_BY(mu_) = 0;  // Bump allocator.
  std::size_t used_ ABSL_GUARDED_BY(mu_) = 0;  // Bytes of live handles.
  // Handles with a memfd of their own (kFileHandleBit set).
  absl::flat_hash_map<PhysicalHandle, File> files_ ABSL_GUARDED_BY(mu_);
  std::uint64_t next_file_ ABSL_GUARDED_BY(mu_) = 0;
};

absl::Status ValidateHostOptions(const HostBackendOptions& options,
                                 std::size_t page) {
  if (!IsPowerOfTwo(options.granularity) || options.granularity % page != 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "HostBackendOptions.granularity must be a power of two and a multiple "
        "of the page size %d; got %d",
        page, options.granularity));
  }
  if (options.granularity > kFileBytes) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "HostBackendOptions.granularity %d is above the backend's limit %d",
        options.granularity, kFileBytes));
  }
  if (options.max_reservation_bytes == 0 ||
      options.max_reservation_bytes % options.granularity != 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "HostBackendOptions.max_reservation_bytes must be a non-zero multiple "
        "of the granularity %d; got %d",
        options.granularity, options.max_reservation_bytes));
  }
  if (options.max_reservation_bytes > (std::size_t{1} << 47)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "HostBackendOptions.max_reservation_bytes %d exceeds the 128 TiB "
        "user address space",
        options.max_reservation_bytes));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::shared_ptr<Backend>> MakeHostBackend(
    const HostBackendOptions& options) {
  const long page_or_error = ::sysconf(_SC_PAGESIZE);  // NOLINT(runtime/int)
  if (page_or_error <= 0) {
    return VATTN_ERRNO_STATUS(errno, "sysconf(_SC_PAGESIZE)",
                              "MakeHostBackend");
  }
  const auto page = static_cast<std::size_t>(page_or_error);
  if (absl::Status s = ValidateHostOptions(options, page); !s.ok()) return s;

  std::size_t limit = options.physical_limit_bytes;
  if (limit == 0) {
    const long pages = ::sysconf(_SC_PHYS_PAGES);  // NOLINT(runtime/int)
    if (pages <= 0) {
      return VATTN_ERRNO_STATUS(errno, "sysconf(_SC_PHYS_PAGES)",
                                "MakeHostBackend");
    }
    limit = static_cast<std::size_t>(pages) * page;
  }

  const int fd = ::memfd_create("vattn-host", MFD_CLOEXEC);
  if (fd < 0) {
    return VATTN_ERRNO_STATUS(errno, "memfd_create", "MakeHostBackend");
  }
  if (::ftruncate(fd, static_cast<off_t>(kFileBytes)) != 0) {
    const int err = errno;
    ::close(fd);
    return VATTN_ERRNO_STATUS(err, "ftruncate",
                              absl::StrFormat("sizing the memfd to %d bytes",
                                              kFileBytes));
  }

  BackendCapabilities caps;
  caps.name = "host";
  caps.device = -1;
  caps.granularity = options.granularity;
  caps.max_reservation_bytes = options.max_reservation_bytes;
  caps.physical_memory_bytes = limit;
  caps.host_accessible = true;
  caps.has_streams = false;
  caps.exportable = options.exportable_handles;
  return std::shared_ptr<Backend>(
      std::make_shared<HostBackend>(std::move(caps), fd, limit));
}

}  // namespace vattn
