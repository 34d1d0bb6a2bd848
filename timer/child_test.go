package timer_test

// childMain runs the child's part when the test binary was started by a
// fault test, and reports whether it did.
func childMain() bool { return false }
