"""The exit codes of the scripts the drivers run on a hypervisor (memdump/hypervisors/sh/)
and of the QMP client they run (remote/qmp.py): one table, one meaning per code.

The same table is in sh/lib.sh as shell variables (``EXIT_NO_VM=96``) and in qmp.py as
constants (``EXIT_NOT_QEMU = 74``): tests/unit/test_exitcodes.py checks that all three
agree and that no script exits with a bare number other than 0 or 1. A script that
passes on a tool's own failure (virsh, qm) exits with that tool's status, 1 as a rule.
"""

from __future__ import annotations

from enum import IntEnum


class Exit(IntEnum):
    OK = 0
    FAILED = 1  # a tool's own failure passed on (virsh, qm), or QEMU answered with an error
    # The QMP client (remote/qmp.py), any mode.
    NO_GREETING = 71  # the socket sent no QMP greeting
    NOT_QMP = 72  # what the socket sent is not QMP, or qmp_capabilities was refused
    QMP_LOST = 73  # the QMP connection closed or timed out
    NOT_QEMU = 74  # the socket is not served by an allowed QEMU binary: nothing was sent
    NO_CONNECT = 75  # cannot connect to the QMP socket
    FIFO_NO_READER = 76  # the dump's FIFO has no reader (or is not the script's)
    # Live capture (the QMP client's live mode, libvirt's live.sh).
    LIVE_UNSUPPORTED = 77  # found before the guest was touched; a line on stderr says why
    MIGRATION_FAILED = 78  # the migration ended failed or cancelled, or did not complete
    LEFT_PAUSED = 79  # the migration left the guest paused; it was resumed
    STOPPED = 80  # the QMP client was stopped by a signal (the migration cancelled)
    MONITOR_FAILED = 81  # a QEMU monitor command failed (libvirt's live.sh)
    NO_RUN_DIR = 83  # no private run directory, or the userfaultfd window cannot open
    WRITE_PROTECTED = 85  # QEMU < 8.1 left guest memory write-protected after a failure
    # Paused dumps.
    MONITOR_REFUSED = 88  # the HMP monitor refused dump-guest-memory (proxmox)
    DUMP_INCOMPLETE = 89  # QEMU's `info dump` did not say "completed" (proxmox)
    NO_TEMP_DIR = 90  # the dump's temp dir cannot be made, or its path is not plain
    TEMP_FILE = 91  # a file in the temp dir cannot be made (the FIFO, the staged file)
    READER_FAILED = 92  # the reader of the FIFO or staged file failed
    NO_TOKEN = 93  # no token on stdin, or the lock or the token file cannot be made
    CANCELLED = 94  # a staged dump was cancelled before it started
    NO_PYTHON = 95  # python3 is missing on the hypervisor, or too old for the client
    NO_VM = 96  # no such VM (QMP socket, Proxmox vmid)
    BAD_ARGUMENT = 97  # an argument is malformed (a driver's bug: it checks them first)
    NO_QMP_DIR = 98  # the qemu driver's qmp_dir does not exist
    NO_SPACE = 99  # not enough free space to stage the dump (memdump-insufficient-space)
    NO_MEMORY_SIZE = 100  # the domain's memory size cannot be read (staged dump)
    NO_FREE_SPACE = 101  # the free space where the dump would be staged cannot be read
    QM_FAILED = 102  # `qm config` or `qm status` failed for a VM that exists
    SIGNAL = 143  # the script was ended by a signal (128 + SIGTERM, whichever it was)
