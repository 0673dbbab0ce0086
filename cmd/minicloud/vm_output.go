package main

import (
	"fmt"
	"io"
	"strconv"
	"strings"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
)

func vmAddresses(vm *minicloudv1.VM) string {
	var ips []string
	for _, a := range vm.GetStatus().GetAddresses() {
		if a.GetIp() != "" {
			ips = append(ips, a.GetIp())
		}
	}
	return orDash(strings.Join(ips, ","))
}

func vmTable(w io.Writer, vms []*minicloudv1.VM, withProject bool) error {
	header := []string{"NAME", "PHASE", "HOST", "ADDRESS", "IMAGE", "FLAVOR", "AGE"}
	if withProject {
		header = append([]string{"PROJECT"}, header...)
	}
	rows := make([][]string, 0, len(vms))
	for _, vm := range vms {
		row := []string{
			vm.GetMeta().GetName(),
			phaseOf(vm),
			orDash(vm.GetStatus().GetHost()),
			vmAddresses(vm),
			vm.GetSpec().GetImage(),
			vm.GetSpec().GetFlavor(),
			age(vm.GetMeta().GetCreateTime()),
		}
		if withProject {
			row = append([]string{vm.GetMeta().GetProject()}, row...)
		}
		rows = append(rows, row)
	}
	return writeTable(w, header, rows)
}

func vmDetails(w io.Writer, vm *minicloudv1.VM) error {
	spec, st := vm.GetSpec(), vm.GetStatus()
	power := strings.ToLower(enumName(spec.GetPowerState().String(), "POWER_STATE_"))
	res := spec.GetResources()
	fields := []field{
		{"Name", vm.GetMeta().GetName()},
		{"ID", vm.GetMeta().GetId()},
		{"Project", vm.GetMeta().GetProject()},
		{"Phase", phaseOf(vm)},
		{"Host", orDash(st.GetHost())},
		{"Hypervisor", orDash(st.GetHypervisor())},
		{"Image", spec.GetImage()},
		{"Flavor", fmt.Sprintf("%s (%d vCPU, %d MiB, %d GiB)", spec.GetFlavor(), res.GetVcpus(), res.GetMemoryMib(), res.GetDiskGib())},
		{"Networks", orDash(strings.Join(spec.GetNetworks(), ","))},
		{"Power", power},
		{"Config drive", strconv.FormatBool(spec.GetConfigDrive())},
		{"User data", userDataSummary(spec)},
		{"SSH keys", strconv.Itoa(len(spec.GetSshPublicKeys()))},
		{"Tags", orDash(strings.Join(spec.GetTags(), ","))},
		{"Resource version", strconv.FormatInt(vm.GetMeta().GetResourceVersion(), 10)},
		{"Availability zone", orDash(spec.GetAvailabilityZone())},
		{"Server group", orDash(spec.GetServerGroup())},
		{"On host failure", hostFailurePolicies.name(int32(spec.GetOnHostFailure()))},
		{"Restart policy", restartPolicies.name(int32(spec.GetRestartPolicy()))},
		{"Assignment epoch", strconv.FormatInt(st.GetAssignmentEpoch(), 10)},
		{"Created", timestamp(vm.GetMeta().GetCreateTime())},
	}
	if m := reasonAndMessage(st.GetReason(), st.GetMessage()); m != "" {
		fields = append(fields, field{"Message", m})
	}
	if st.GetHostDown() {
		fields = append(fields, field{"Warning", "the VM's host lost its heartbeat"})
	}
	if err := writeFields(w, fields); err != nil {
		return err
	}
	if addrs := st.GetAddresses(); len(addrs) > 0 {
		fmt.Fprintln(w, "\nAddresses:")
		rows := make([][]string, 0, len(addrs))
		for _, a := range addrs {
			rows = append(rows, []string{"  " + a.GetNetwork(), fmt.Sprintf("%s/%d", a.GetIp(), a.GetPrefixLength()), orDash(a.GetGateway()), orDash(a.GetMac())})
		}
		if err := writeTable(w, []string{"  NETWORK", "ADDRESS", "GATEWAY", "MAC"}, rows); err != nil {
			return err
		}
	}
	if fwds := spec.GetPortForwards(); len(fwds) > 0 {
		fmt.Fprintf(w, "\nPort forwards (on host %s):\n", orDash(st.GetHost()))
		for _, f := range fwds {
			fmt.Fprintf(w, "  %s\n", forwardLine(vm, f))
		}
	}
	if err := guestMetadataDetails(w, vm); err != nil {
		return err
	}
	if conds := st.GetConditions(); len(conds) > 0 {
		fmt.Fprintln(w, "\nConditions:")
		rows := make([][]string, 0, len(conds))
		for _, c := range conds {
			rows = append(rows, []string{"  " + c.GetType(), strconv.FormatBool(c.GetStatus()), orDash(c.GetReason()), age(c.GetLastTransitionTime()), orDash(c.GetMessage())})
		}
		if err := writeTable(w, []string{"  TYPE", "STATUS", "REASON", "AGE", "MESSAGE"}, rows); err != nil {
			return err
		}
	}
	return nil
}

func userDataSummary(spec *minicloudv1.VMSpec) string {
	if !spec.GetHasUserData() {
		return "none"
	}
	return bytesIEC(spec.GetUserDataSize())
}

func eventTable(w io.Writer, events []*minicloudv1.Event) error {
	rows := make([][]string, 0, len(events))
	for _, e := range events {
		rows = append(rows, []string{timestamp(e.GetTime()), orDash(e.GetType()), orDash(e.GetReason()), orDash(e.GetSource()), e.GetMessage()})
	}
	return writeTable(w, []string{"TIME", "TYPE", "REASON", "SOURCE", "MESSAGE"}, rows)
}

// reasonAndMessage joins a status's reason and message as "Reason: message",
// leaving out whichever is empty.
func reasonAndMessage(reason, message string) string {
	switch {
	case reason == "":
		return message
	case message == "":
		return reason
	}
	return reason + ": " + message
}
