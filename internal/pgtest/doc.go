// Package pgtest gives tests an isolated PostgreSQL database each.
//
// The first call to [URL] or [Pool] in a test binary starts one throwaway
// cluster ([pgcluster.Start] with Fast set: fsync off) shared by every test
// of the binary; each call then creates a fresh database on it, named
// troupe_test_<pid>_<n>, and drops it (WITH (FORCE)) when the test ends.
// Tests may run in parallel.
//
// Setting the environment variable TROUPE_TEST_DATABASE_URL to the URL of an
// existing server (a superuser, or a user allowed to create databases) uses
// that server instead of starting one; the isolated databases are still
// created and dropped on it.
//
// A package whose tests use pgtest wraps its TestMain's m so the cluster
// stops when the tests end:
//
//	func TestMain(m *testing.M) {
//		goleak.VerifyTestMain(pgtest.WithCluster(m))
//	}
//
// If the test binary is killed instead (a timeout, a signal), the cluster's
// watchdog stops the server and removes its files once the process has
// exited; see package pgcluster.
//
// When no server can be had, the test fails with the reason (for instance
// how to install PostgreSQL); it never skips.
package pgtest
