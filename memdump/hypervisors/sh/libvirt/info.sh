# $1 = URI, $2 = domain (id, name or UUID). dominfo, the digest of the domain's XML, a
# "--memdump-versions--" line, virsh version and the host name.
virsh -c "$1" dominfo "$2" || exit $?
# The digest of virsh's output byte for byte (no $(...), which would drop newlines); the
# first call only tells whether there is a definition to digest (sh has no pipefail).
virsh -c "$1" dumpxml "$2" >/dev/null 2>&1 &&
  echo "Memdump domain xml digest: $(virsh -c "$1" dumpxml "$2" | sha256sum | cut -d' ' -f1)"
echo '--memdump-versions--'
virsh -c "$1" version || true
hostname
