# The reader of a live capture's FIFO (run as `perl -e FIFO_READER [drain]`: stdin the
# FIFO QEMU writes the migration stream into, stdout the SSH channel): what cat did, in
# large writes.
#
# Why: QEMU's background snapshot (7.2) flushes its buffer before it releases each page's
# write protection, so the stream comes one 4 KiB page per write(2). cat passed each on
# as one read and one write, and sshd and the collector's ssh handled each as a packet of
# its own (a paused dump's FIFO is read 64 KiB at a time: QEMU writes larger pieces).
# Measured on the lab (libvirt, the FIFO drained to /dev/null): 0.7 s less system CPU in
# the reader per GiB; whole live captures 2.8 s shorter for a 4 GiB guest (36 s), 0.5 s
# for 1 GiB (10 s).
#
# So the FIFO's pipe is made 1 MiB (F_SETPIPE_SZ; the host's fs.pipe-max-size may refuse)
# and after a read that found less than 128 KiB the reader waits 1 ms for QEMU to write
# more. With the pipe at its default 64 KiB it never waits: QEMU would fill it, block,
# and the stream would be paced by the waits.
#
#   drain   once stdout fails (the collector is gone), read the rest into nothing until
#           QEMU closes the stream (libvirt/live.sh says why), as `cat; cat >/dev/null`.
# Exit status 0: every byte copied; 1: stdout failed; 2: stdin failed.
use strict;
use warnings;

my ($F_SETPIPE_SZ, $F_GETPIPE_SZ) = (1031, 1032);
my $SIZE = 1 << 20;
my $SMALL = 128 * 1024;
my $drain = @ARGV && $ARGV[0] eq 'drain';
$SIG{PIPE} = 'IGNORE';
binmode STDIN;
binmode STDOUT;
my $pipe = fcntl(STDIN, $F_SETPIPE_SZ, $SIZE) ? fcntl(STDIN, $F_GETPIPE_SZ, 0) : 0;
my $wait = $pipe && $pipe >= $SIZE;
my ($buf, $rc, $out) = ('', 0, 1);
while (1) {
    my $n = sysread(STDIN, $buf, $SIZE);
    if (!defined $n) {
        next if $!{EINTR};
        print STDERR "memdump: reading the FIFO: $!\n";
        exit 2;
    }
    last if $n == 0;
    my $at = 0;
    while ($out && $at < $n) {
        my $w = syswrite(STDOUT, $buf, $n - $at, $at);
        if (!defined $w) {
            next if $!{EINTR};
            print STDERR "memdump: writing the stream: $!\n";
            exit 1 unless $drain;
            ($out, $rc) = (0, 1);
        } else {
            $at += $w;
        }
    }
    select(undef, undef, undef, 0.001) if $wait && $n < $SMALL;
}
exit $rc;
