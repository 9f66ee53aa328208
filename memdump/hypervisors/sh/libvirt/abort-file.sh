# $1 = URI, $2 = domain, $3 = the staged dump's own directory (its memdump-dir line);
# stdin: its token. Nothing is done unless that directory passes memdump_enter (ours,
# nobody else can change its entries) and holds the token; "cancel" is made there with
# noclobber (no existing file, no symlink followed). Over SSH nothing signals the script
# when the channel closes, and while QEMU writes the file nothing is written to the
# channel either. So: mark the dump cancelled (see dump-file.sh), then, for as long as
# the script says its dump may be starting or running, stop it. libvirt refuses
# domjobabort for a memory-only dump ("cannot abort memory-only dump", libvirt 9), so
# the writer libvirt put between QEMU and our file (libvirt_iohelper, its command line
# naming our private "$3/mem") is killed: QEMU's dump then fails and QEMU resumes the
# guest, as when a FIFO dump's reader goes. domjobabort is still asked, for a libvirt
# that can abort it. Bounded: ~15 s.
memdump_enter_own "$3" || exit 0
(set -C; : >cancel) 2>/dev/null
i=0
while [ -e dumping ] && [ "$i" -lt 50 ]; do
  grep -laF -- "$3/mem" /proc/[0-9]*/cmdline 2>/dev/null | while read -r f; do
    case $(tr '\0' ' ' <"$f" 2>/dev/null) in
      *libvirt_iohelper" $3/mem "*) p=${f#/proc/}; kill "${p%/cmdline}" 2>/dev/null ;;
    esac
  done
  virsh -c "$1" domjobabort "$2" >/dev/null 2>&1
  i=$((i + 1))
  sleep 0.2 2>/dev/null || sleep 1
done
exit 0
