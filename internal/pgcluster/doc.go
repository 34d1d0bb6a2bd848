// Package pgcluster starts a throwaway PostgreSQL cluster from the binaries
// installed on the machine, for tests (through internal/pgtest) and for
// `troupe bench --db postgres`.
//
// [Start] runs initdb into a fresh temporary directory and starts the server
// with pg_ctl on 127.0.0.1 and a free port, with trust authentication for the
// user postgres (replication connections included, so the WAL can be tailed),
// wal_level=logical, and the Unix socket inside the temporary directory.
// fsync stays on unless [Config.Fast] is set, so benchmarks measure the real
// cost of a durable commit. [Cluster.URL] names a database on it and
// [Cluster.Stop] stops the server and removes the directory.
//
// The binaries are looked up on PATH, then under /usr/lib/postgresql/*/bin
// (highest version first). When the process runs as root, initdb and pg_ctl
// run as the postgres user through runuser, since PostgreSQL refuses to run
// as root.
//
// A process that dies without calling Stop (killed by a signal, a test binary
// that times out) does not leave the server running: Start also launches a
// small watchdog shell, in its own process group, that holds the read end of
// a pipe whose write end only this process has. When this process exits for
// any reason the pipe closes, and the watchdog stops the server (pg_ctl stop
// -m immediate) and removes the directory. Stop ends the watchdog before it
// stops the server itself.
package pgcluster
