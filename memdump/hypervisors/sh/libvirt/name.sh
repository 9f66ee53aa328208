# $1 = URI, $2 = domain (id, name or UUID). virsh dominfo alone (its "Name:" line): what
# resolve needs, without info.sh's XML digest and versions (three more virsh calls,
# which the capture's snapshot makes anyway).
virsh -c "$1" dominfo "$2"
