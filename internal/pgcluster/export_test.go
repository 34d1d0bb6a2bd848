package pgcluster

// DirOf exposes the cluster's temporary directory to the tests.
func DirOf(c *Cluster) string { return c.dir }
