"""The sandbox's first process: builds the confinement, then runs the command (stdlib only).

Run as `python -I -S _sandbox_init.py` by security/sandbox.py, its configuration
as JSON in $LLMOS_SANDBOX_CONFIG. With
namespaces it unshares mount, network, pid, ipc and uts namespaces, forks the
pid namespace's init, builds a fresh root on tmpfs (read-only binds of the
system's programs and libraries, the working directory read-write at /work, a
private /tmp, a new /proc), chroots into it, and forks the command, which
drops to an unprivileged uid with no_new_privs and the resource limits before
it execs. When the command ends, the namespace's init exits, and the kernel
kills every process left in the namespace: nothing survives the command.
Without namespaces it only applies the uid drop (when root) and the limits.
Where the kernel made a cgroup for the call, this process joins it first.
"""

import ctypes
import json
import os
import resource
import signal
import sys

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC = 1, 2, 4, 32, 4096, 16384
MS_PRIVATE = 1 << 18
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
SETUP_FAILED = 125

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(src, dst, fstype, flags, data=None) -> None:
    enc = [None if x is None else x.encode() for x in (src, dst, fstype, data)]
    _check(_libc.mount(enc[0], enc[1], enc[2], ctypes.c_ulong(flags), enc[3]), f"mount {dst}")


def _bind(src: str, dst: str, writable: bool = False, device: bool = False) -> None:
    if os.path.isdir(src):
        os.makedirs(dst, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        open(dst, "a").close()
    _mount(src, dst, None, MS_BIND | MS_REC)
    flags = MS_REMOUNT | MS_BIND | MS_NOSUID | (0 if device else MS_NODEV) | (0 if writable else MS_RDONLY)
    _mount(None, dst, None, flags)


def _build_root(cfg: dict) -> str:
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount leaks back to the host
    root = cfg["newroot"]
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=16m,mode=755")
    for path in cfg["ro_binds"]:
        if not os.path.lexists(path):
            continue
        dst = root + path
        if os.path.islink(path) and os.path.dirname(path) == "/":
            os.symlink(os.readlink(path), dst)  # /bin -> usr/bin on merged-/usr systems
        else:
            _bind(path, dst)
    _bind(cfg["workdir"], root + "/work", writable=True)
    os.makedirs(root + "/tmp", exist_ok=True)
    _mount("tmpfs", root + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={cfg['tmp_mb']}m,mode=1777")
    os.makedirs(root + "/proc", exist_ok=True)
    _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV)
    os.makedirs(root + "/dev", exist_ok=True)
    for dev in ("null", "zero", "random", "urandom"):
        _bind("/dev/" + dev, f"{root}/dev/{dev}", writable=True, device=True)
    _mount(None, root, None, MS_REMOUNT | MS_NOSUID | MS_NODEV | MS_RDONLY)
    os.chroot(root)
    os.chdir("/work")
    return "/work"


def _limit(cfg: dict) -> None:
    lim = cfg["limits"]
    for name, value in (("RLIMIT_CPU", lim["cpu_s"]), ("RLIMIT_AS", lim["memory_bytes"]),
                        ("RLIMIT_NPROC", lim["nproc"]), ("RLIMIT_NOFILE", lim["nofile"]),
                        ("RLIMIT_FSIZE", lim["fsize_bytes"]), ("RLIMIT_CORE", 0)):
        resource.setrlimit(getattr(resource, name), (value, value))


def _drop_and_exec(cfg: dict, cwd: str) -> None:
    try:
        if os.getuid() == 0 and cfg["uid"] is not None:
            os.setgroups([])
            os.setgid(cfg["gid"])
            os.setuid(cfg["uid"])
        _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
        _limit(cfg)
        os.chdir(cwd)
        os.umask(0o022)
        for sig in (signal.SIGPIPE, signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        os.execve(cfg["argv"][0], cfg["argv"], cfg["env"])
    except OSError as e:
        sys.stderr.write(f"sandbox: cannot start {cfg['argv'][0]}: {e}\n")
        sys.stderr.flush()
        os._exit(127 if isinstance(e, FileNotFoundError) else SETUP_FAILED)


def _status_code(status: int) -> int:
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def main() -> None:
    cfg = json.loads(os.environ.pop("LLMOS_SANDBOX_CONFIG"))
    if cfg.get("cgroup_procs"):  # first, so that every process the call starts is counted
        try:
            with open(cfg["cgroup_procs"], "w") as f:
                f.write(str(os.getpid()))
        except OSError as e:
            sys.stderr.write(f"sandbox: cannot join the call's cgroup: {e}\n")
            os._exit(SETUP_FAILED)
    if not cfg["namespaces"]:
        _drop_and_exec(cfg, cfg["workdir"])
    try:
        _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS),
               "unshare")
    except OSError as e:
        sys.stderr.write(f"sandbox: {e}\n")
        os._exit(SETUP_FAILED)
    init = os.fork()
    if init:  # outside the pid namespace: mirror the namespace init's end
        _, status = os.waitpid(init, 0)
        os._exit(_status_code(status))
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PDEATHSIG)")
    try:
        cwd = _build_root(cfg)
    except OSError as e:
        sys.stderr.write(f"sandbox: cannot build the root: {e}\n")
        os._exit(SETUP_FAILED)
    child = os.fork()
    if child == 0:
        _drop_and_exec(cfg, cwd)
    while True:  # pid 1: reap orphans until the command itself ends
        try:
            pid, status = os.wait()
        except ChildProcessError:
            os._exit(SETUP_FAILED)
        if pid == child:
            os._exit(_status_code(status))  # the kernel now kills whatever is left in the namespace


if __name__ == "__main__":
    main()
