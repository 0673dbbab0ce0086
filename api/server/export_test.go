package server

// SetVMHistory sets how many changes the VM watch cache of servers
// started from now on keeps, and returns a function that restores it.
func SetVMHistory(n int) (restore func()) {
	old := vmHistory
	vmHistory = n
	return func() { vmHistory = old }
}
