package libvirt

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// KVM ioctl numbers from <linux/kvm.h> (x86_64).
const (
	kvmGetAPIVersion       = 0xAE00
	kvmCreateVM            = 0xAE01
	kvmGetVCPUMmapSize     = 0xAE04
	kvmCreateVCPU          = 0xAE41
	kvmSetUserMemoryRegion = 0x4020AE46
	kvmRun                 = 0xAE80
	kvmGetRegs             = 0x8090AE81
	kvmSetRegs             = 0x4090AE82
	kvmGetSregs            = 0x8138AE83
	kvmSetSregs            = 0x4138AE84

	kvmExitHLT = 5

	// offsets inside struct kvm_run / kvm_regs / kvm_sregs.
	runImmediateExit = 1
	runExitReason    = 8
	regsRIP          = 16 * 8
	regsRFLAGS       = 17 * 8
	sregsCSBase      = 0
	sregsCSSelector  = 12
)

// probeLoop is 32-bit code: mov ecx, 1<<24; l: dec ecx; jnz l; hlt. On
// hardware-accelerated KVM it takes a few milliseconds; where every guest
// instruction traps to an emulator it takes tens of seconds.
var probeLoop = []byte{0xb9, 0x00, 0x00, 0x00, 0x01, 0x49, 0x75, 0xfd, 0xf4}

// ProbeKVM reports whether KVM can actually run guests on this host, by
// running a few instructions in a VM made with raw KVM ioctls (no QEMU).
// /dev/kvm existing, and even KVM_RUN of a single HLT succeeding, is not
// enough: under nested virtualisation on some clouds (these machines) every
// guest instruction is trapped and emulated, ~1 µs each, so a Linux guest
// started with accel=kvm never gets far enough to print a line. The probe
// therefore times a 16M-iteration loop in protected mode and gives up after
// timeout (interrupting the stuck KVM_RUN). It returns nil when KVM is
// usable, else the reason it is not.
func ProbeKVM(timeout time.Duration) error {
	return probeCode(timeout, probeLoop, kvmExitHLT, true)
}

func probeCode(timeout time.Duration, code []byte, want uint32, protected bool) error {
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open /dev/kvm: %w", err)
	}
	defer f.Close()
	kvm := f.Fd()
	if v, err := ioctl(kvm, kvmGetAPIVersion, 0); err != nil || v != 12 {
		return fmt.Errorf("KVM_GET_API_VERSION: %d, %v", v, err)
	}
	vmfd, err := ioctl(kvm, kvmCreateVM, 0)
	if err != nil {
		return fmt.Errorf("KVM_CREATE_VM: %w", err)
	}
	defer unix.Close(int(vmfd))

	const memSize = 0x1000
	mem, err := unix.Mmap(-1, 0, memSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_ANONYMOUS)
	if err != nil {
		return fmt.Errorf("mmap guest memory: %w", err)
	}
	defer unix.Munmap(mem)
	copy(mem, code)
	region := struct {
		slot, flags                  uint32
		guestPhys, size, userspaceVA uint64
	}{0, 0, 0, memSize, uint64(uintptr(unsafe.Pointer(&mem[0])))}
	if _, err := ioctl(vmfd, kvmSetUserMemoryRegion, uintptr(unsafe.Pointer(&region))); err != nil {
		return fmt.Errorf("KVM_SET_USER_MEMORY_REGION: %w", err)
	}
	vcpufd, err := ioctl(vmfd, kvmCreateVCPU, 0)
	if err != nil {
		return fmt.Errorf("KVM_CREATE_VCPU: %w", err)
	}
	defer unix.Close(int(vcpufd))
	runSize, err := ioctl(kvm, kvmGetVCPUMmapSize, 0)
	if err != nil {
		return fmt.Errorf("KVM_GET_VCPU_MMAP_SIZE: %w", err)
	}
	run, err := unix.Mmap(int(vcpufd), 0, int(runSize), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return fmt.Errorf("mmap kvm_run: %w", err)
	}
	defer unix.Munmap(run)

	// Real mode, CS base 0, IP 0: the first instruction is our HLT.
	var sregs [312]byte
	if _, err := ioctl(vcpufd, kvmGetSregs, uintptr(unsafe.Pointer(&sregs[0]))); err != nil {
		return fmt.Errorf("KVM_GET_SREGS: %w", err)
	}
	if protected {
		// Flat 32-bit code and data segments, CR0.PE set: the mode a kernel
		// runs in, which nested hosts without unrestricted-guest support
		// still accelerate even when real mode is emulated.
		for i := 0; i < 6; i++ { // cs ds es fs gs ss
			seg := sregs[i*24 : i*24+24]
			*(*uint64)(unsafe.Pointer(&seg[0])) = 0
			*(*uint32)(unsafe.Pointer(&seg[8])) = 0xffffffff
			*(*uint16)(unsafe.Pointer(&seg[12])) = uint16(8 * (i + 1))
			seg[14] = 3 // data read/write, accessed
			if i == 0 {
				seg[14] = 11 // code execute/read, accessed
			}
			seg[15], seg[16], seg[17], seg[18], seg[19], seg[20] = 1, 0, 1, 1, 0, 1
		}
		*(*uint64)(unsafe.Pointer(&sregs[224])) |= 1 // CR0.PE
	} else {
		*(*uint64)(unsafe.Pointer(&sregs[sregsCSBase])) = 0
		*(*uint16)(unsafe.Pointer(&sregs[sregsCSSelector])) = 0
	}
	if _, err := ioctl(vcpufd, kvmSetSregs, uintptr(unsafe.Pointer(&sregs[0]))); err != nil {
		return fmt.Errorf("KVM_SET_SREGS: %w", err)
	}
	var regs [144]byte
	*(*uint64)(unsafe.Pointer(&regs[regsRIP])) = 0
	*(*uint64)(unsafe.Pointer(&regs[regsRFLAGS])) = 2
	if _, err := ioctl(vcpufd, kvmSetRegs, uintptr(unsafe.Pointer(&regs[0]))); err != nil {
		return fmt.Errorf("KVM_SET_REGS: %w", err)
	}

	type result struct {
		exit uint32
		err  error
	}
	done := make(chan result, 1)
	var tid atomic.Int32
	go func() {
		// The thread must stay put so that the watchdog below can signal
		// exactly the thread that sits in KVM_RUN.
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		tid.Store(int32(unix.Gettid()))
		_, err := ioctl(vcpufd, kvmRun, 0)
		done <- result{*(*uint32)(unsafe.Pointer(&run[runExitReason])), err}
	}()

	var r result
	select {
	case r = <-done:
	case <-time.After(timeout):
		// Ask KVM to leave the guest: immediate_exit makes the next entry
		// return EINTR, and a signal kicks the vCPU out of the current one.
		// Repeat until the thread is back, so that the deferred munmaps
		// never pull memory from under a running vCPU.
		run[runImmediateExit] = 1
		tick := time.NewTicker(10 * time.Millisecond)
		defer tick.Stop()
		for r.err == nil && r.exit == 0 {
			if t := tid.Load(); t != 0 {
				_ = unix.Tgkill(unix.Getpid(), int(t), unix.SIGURG)
			}
			select {
			case <-done:
				return fmt.Errorf("a 16M-instruction loop did not finish within %s under KVM (nested KVM that traps every guest instruction)", timeout)
			case <-tick.C:
			}
		}
	}
	if r.err != nil {
		return fmt.Errorf("KVM_RUN: %w", r.err)
	}
	if r.exit != want {
		return fmt.Errorf("KVM_RUN exited with reason %d, want HLT (%d)", r.exit, kvmExitHLT)
	}
	return nil
}

func ioctl(fd, req, arg uintptr) (uintptr, error) {
	r, _, errno := unix.Syscall(unix.SYS_IOCTL, fd, req, arg)
	if errno != 0 {
		return r, errors.New(errno.Error())
	}
	return r, nil
}
