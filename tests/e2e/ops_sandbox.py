"""Run a command under the seccomp filters deploy/asgi-supervise.service asks systemd for.

    python ops_sandbox.py ALLOWED_SYSCALLS_FILE -- COMMAND...

Installs, with libseccomp (what systemd itself uses), then execs COMMAND:
- NoNewPrivileges=yes;
- SystemCallFilter=: every syscall not in the file fails with EPERM
  (SystemCallErrorNumber=EPERM); the test computes the list from systemd-analyze;
- MemoryDenyWriteExecute=yes: systemd 252's rules, mmap with PROT_WRITE|PROT_EXEC,
  mprotect/pkey_mprotect with PROT_EXEC and shmat with SHM_EXEC fail with EPERM;
- RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX: socket() of any other family fails
  with EAFNOSUPPORT.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import sys

ALLOW = 0x7FFF0000
MASKED_EQ, EQ = 7, 4
SHM_EXEC = 0o100000
ALLOWED_FAMILIES = {1, 2, 10}  # AF_UNIX, AF_INET, AF_INET6
AF_MAX = 46


def errno_action(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


class ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
lib.seccomp_init.restype = ctypes.c_void_p
lib.seccomp_init.argtypes = [ctypes.c_uint32]
lib.seccomp_rule_add_array.argtypes = [
    ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(ArgCmp),
]  # fmt: skip
lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
lib.seccomp_load.argtypes = [ctypes.c_void_p]


def nr(name: str) -> int:
    return lib.seccomp_syscall_resolve_name(name.encode())


def rule(ctx: int, action: int, syscall: str, *cmps: tuple[int, int, int, int]) -> None:
    number = nr(syscall)
    if number < 0:
        return  # not a syscall of this architecture
    array = (ArgCmp * max(1, len(cmps)))(*[ArgCmp(*c) for c in cmps])
    code = lib.seccomp_rule_add_array(ctx, action, number, len(cmps), array)
    if code < 0:
        raise OSError(-code, f"seccomp_rule_add {syscall}")


def load(ctx: int) -> None:
    code = lib.seccomp_load(ctx)
    if code < 0:
        raise OSError(-code, "seccomp_load")


def main() -> None:
    allowed_file, command = sys.argv[1], sys.argv[sys.argv.index("--") + 1 :]
    with open(allowed_file) as f:
        allowed = f.read().split()

    # MemoryDenyWriteExecute and RestrictAddressFamilies: first (the allow
    # list may forbid loading more filters). libseccomp sets no_new_privs (NoNewPrivileges).
    ctx = lib.seccomp_init(ALLOW)
    deny = errno_action(errno.EPERM)
    write_exec = mmap.PROT_WRITE | mmap.PROT_EXEC
    rule(ctx, deny, "mmap", (2, MASKED_EQ, write_exec, write_exec))
    rule(ctx, deny, "mprotect", (2, MASKED_EQ, mmap.PROT_EXEC, mmap.PROT_EXEC))
    rule(ctx, deny, "pkey_mprotect", (2, MASKED_EQ, mmap.PROT_EXEC, mmap.PROT_EXEC))
    rule(ctx, deny, "shmat", (2, MASKED_EQ, SHM_EXEC, SHM_EXEC))
    for family in set(range(AF_MAX)) - ALLOWED_FAMILIES:
        rule(ctx, errno_action(errno.EAFNOSUPPORT), "socket", (0, EQ, family, 0))
    load(ctx)
    # SystemCallFilter: an allow list, everything else EPERM.
    ctx = lib.seccomp_init(errno_action(errno.EPERM))
    for name in allowed:
        rule(ctx, ALLOW, name)
    load(ctx)  # last: it may not allow seccomp(2) itself

    os.execv(command[0], command)


if __name__ == "__main__":
    main()
