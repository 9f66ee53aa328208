# $1 = libvirt URI. Running domains only: a shut-off domain has no memory to dump.
exec virsh -q -c "$1" list --name
