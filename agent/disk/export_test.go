package disk

// Inspections is how many qemu-img processes this package has run.
func Inspections() int64 { return inspections.Load() }
