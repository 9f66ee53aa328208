# Put a QEMU's guest RAM back on transparent huge pages after a live capture (run as
# `perl -e HUGEPAGES MODE ...` by libvirt/live.sh and by the QMP client's live mode,
# root, Linux >= 6.1; perl because process_madvise has no shell command and perl-base is
# on every Debian-like host).
#
# Why: QEMU (7.2) write-protects guest RAM while the vCPUs are stopped, a few page-table
# entries per MiB on huge pages, 256 per MiB on 4 KiB pages; its background snapshot
# then releases the protection 4 KiB at a time, which leaves every huge page mapped by
# 4 KiB entries until khugepaged joins them again (about 40 minutes for 4 GiB at its
# defaults). The next live capture of the VM pauses it about 5x longer (4 GiB: 11-15 ms
# from huge pages, 46-72 ms after a capture, measured on the lab), and the guest runs
# with more TLB misses meanwhile.
#
#   scan PID          before the capture: the 2 MiB regions of PID's anonymous
#                     THP-eligible mappings whose memory is a huge page now (pagemap ->
#                     kpageflags: THP, not the huge zero page). stdout: "start STARTTIME"
#                     (PID's start time, /proc/PID/stat field 22), then "HEXADDR COUNT"
#                     per run of regions.
#   collapse PID [SEC] after it: that output on stdin; MADV_COLLAPSE (process_madvise) on
#                     exactly those regions, so memory that was not a huge page before
#                     (zero pages, 4 KiB pages) is never turned into one: the guest's
#                     RSS does not grow. Stops starting new calls after SEC seconds
#                     (default 60: the callers' bound, kept here once).
#                     stdout: "REGIONS COLLAPSED FAILED MS [ERROR]".
# Exit status 2: bad arguments, 3: the process is gone or not the one scanned, 4: the
# kernel cannot (no pidfd_open/process_madvise/MADV_COLLAPSE), 5: /proc/kpageflags not
# readable (it needs root: without it pagemap hides the page frames too), 1: anything else.
use strict;
use warnings;
no warnings 'portable';    # 64-bit addresses in hex

my $HUGE = 2 * 1024 * 1024;
my $PAGE = 4096;
# Generic syscall numbers (the same on every architecture since Linux 5.x).
my ($SYS_PIDFD_OPEN, $SYS_PROCESS_MADVISE, $MADV_COLLAPSE) = (434, 440, 25);
my ($KPF_THP, $KPF_ZERO_PAGE) = (22, 24);
my $PER_CALL = 32;    # regions per process_madvise call: 64 MiB, so the deadline is checked

sub fail {
    my ($code, $why) = @_;
    print STDERR "hugepages: $why\n";
    exit $code;
}

my ($mode, $pid, $sec) = @ARGV;
defined $pid && $pid =~ /^[1-9][0-9]{0,9}$/ or fail(2, 'bad pid');

sub starttime {
    open(my $fh, '<', "/proc/$pid/stat") or return '';
    my $stat = <$fh>;
    close $fh;
    # The command name (field 2) may hold spaces and ')': fields after its last ')'.
    $stat =~ s/.*\) //s or return '';
    my @f = split / /, $stat;
    return $f[19] // '';
}

sub scan {
    # First: without root nothing below can work (pagemap hides the page frames).
    open(my $kf, '<:raw', '/proc/kpageflags') or fail(5, "/proc/kpageflags: $!");
    my $start = starttime();
    $start ne '' or exit 3;
    open(my $maps, '<', "/proc/$pid/smaps") or exit 3;
    my (@vmas, $lo, $hi, $anon);
    while (my $line = <$maps>) {
        if ($line =~ /^([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ (\d+)/) {
            ($lo, $hi, $anon) = (hex $1, hex $2, $3 == 0);
        } elsif ($line =~ /^THPeligible:\s+1/ && $anon && $hi - $lo >= $HUGE) {
            push @vmas, [$lo, $hi];
        }
    }
    close $maps;
    open(my $pm, '<:raw', "/proc/$pid/pagemap") or exit 3;
    my @runs;
    for my $v (@vmas) {
        my $a = ($v->[0] + $HUGE - 1) & ~($HUGE - 1);
        for (; $a + $HUGE <= $v->[1]; $a += $HUGE) {
            my $b;
            sysseek($pm, ($a / $PAGE) * 8, 0) && sysread($pm, $b, 8) == 8 or next;
            my $ent = unpack('Q<', $b);
            next unless ($ent >> 63) & 1;    # present
            my $pfn = $ent & ((1 << 55) - 1);
            $pfn or next;                    # no page frame shown
            sysseek($kf, $pfn * 8, 0) && sysread($kf, $b, 8) == 8 or next;
            my $flags = unpack('Q<', $b);
            next unless ($flags >> $KPF_THP) & 1;
            next if ($flags >> $KPF_ZERO_PAGE) & 1;
            if (@runs && $runs[-1][0] + $runs[-1][1] * $HUGE == $a) {
                $runs[-1][1]++;
            } else {
                push @runs, [$a, 1];
            }
        }
    }
    print "start $start\n";
    printf "%x %d\n", @$_ for @runs;
    return 0;
}

sub collapse {
    $sec //= 60;
    $sec =~ /^[0-9]{1,5}$/ or fail(2, 'bad seconds');
    my $t0 = time;
    my $first = <STDIN> // '';
    my ($start) = $first =~ /^start ([0-9]+)$/ or fail(2, 'no scan on stdin');
    my @runs;
    while (my $line = <STDIN>) {
        $line =~ /^([0-9a-f]{1,16}) ([0-9]{1,9})$/ or fail(2, 'bad scan line');
        push @runs, [hex $1, $2];
    }
    my $regions = 0;
    $regions += $_->[1] for @runs;
    my $pidfd = syscall($SYS_PIDFD_OPEN, $pid + 0, 0);
    $pidfd >= 0 or exit($!{ENOSYS} ? 4 : 3);
    # The pidfd holds this process: the same start time now means it is the one scanned.
    starttime() eq $start or exit 3;
    my ($ok, $failed, $err) = (0, 0, '');
    my $w0 = _now();
    for my $r (@runs) {
        for (my $i = 0; $i < $r->[1]; $i += $PER_CALL) {
            my $n = $r->[1] - $i < $PER_CALL ? $r->[1] - $i : $PER_CALL;
            if (time - $t0 > $sec) {
                $failed += $n;
                $err = 'deadline';
                next;
            }
            my $iov = pack('QQ', $r->[0] + $i * $HUGE, $n * $HUGE);
            my $rc = syscall($SYS_PROCESS_MADVISE, $pidfd, $iov, 1, $MADV_COLLAPSE, 0);
            # EAGAIN: a page was busy for a moment (seen on the lab, 1 call in 400): once more.
            $rc = syscall($SYS_PROCESS_MADVISE, $pidfd, $iov, 1, $MADV_COLLAPSE, 0)
                if $rc < 0 && $!{EAGAIN};
            if ($rc >= 0) {
                $ok += $n;
            } else {
                exit 4 if $!{ENOSYS} || $!{EINVAL};
                $failed += $n;
                ($err = "$!") =~ s/[^A-Za-z0-9 ]//g;
            }
        }
    }
    printf "%d %d %d %d%s\n", $regions, $ok, $failed, (_now() - $w0) * 1000, $err ne '' ? " $err" : '';
    return 0;
}

sub _now {
    # CLOCK_MONOTONIC without Time::HiRes (not in perl-base): /proc/uptime has 10 ms steps.
    open(my $fh, '<', '/proc/uptime') or return time;
    my ($up) = split / /, scalar <$fh>;
    close $fh;
    return $up;
}

if ($mode eq 'scan') {
    exit scan();
} elsif ($mode eq 'collapse') {
    exit collapse();
}
fail(2, 'mode is scan or collapse');
