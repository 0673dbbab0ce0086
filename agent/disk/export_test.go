package disk

// Inspections is how many qemu-img processes this package has run.
func Inspections() int64 { return inspections.Load() }

// Remembered is how many disks the overlay memo holds.
func Remembered() int { return overlayInfos.len() }

// MaxRemembered is the memo's bound.
const MaxRemembered = maxOverlayInfos

// Remember stores an entry for path as a check of it would (the bound is
// tested without thousands of qemu-img runs).
func Remember(path string) { overlayInfos.store(path, overlayInfo{}) }
