# $1 = URI, $2 = domain (id, name or UUID). dominfo, the digest of the domain's XML, a
# "--memdump-versions--" line, virsh version and the host name.
virsh -c "$1" dominfo "$2" || exit $?
# The digest of virsh's output byte for byte: $(...) drops trailing newlines, so a "."
# follows the XML, printed only if virsh succeeded (sh has no pipefail), and is cut off
# before hashing. One virsh call, not a first one to learn whether it succeeds.
xml=$(virsh -c "$1" dumpxml "$2" 2>/dev/null && echo .)
[ -n "$xml" ] &&
  echo "Memdump domain xml digest: $(printf '%s' "${xml%.}" | sha256sum | cut -d' ' -f1)"
echo '--memdump-versions--'
virsh -c "$1" version || true
hostname
