# $1 = qm. `qm list` as it prints it.
exec "$1" list
