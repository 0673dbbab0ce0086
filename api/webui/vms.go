package webui

import (
	"net/http"
	"net/url"
	"strings"

	"github.com/google/uuid"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/client"
	"github.com/minicloud/minicloud/pkg/errdefs"
)

// createForm is the create-VM form: what the user typed, the choices
// offered, and the API's error next to the field it is about.
type createForm struct {
	Name, Image, Flavor, Network, SSHKey string
	// RequestID makes a resubmitted form (a double click, a retry after a
	// lost answer) create the VM once (CreateVMRequest.request_id).
	RequestID string
	Images    []*minicloudv1.Image
	Flavors   []*minicloudv1.Flavor
	Networks  []*minicloudv1.Network
	// Errors maps a field name to the API's message about it; "" is an
	// error about no one field.
	Errors map[string]string
	// Created names the VM the previous submit created.
	Created string
}

type vmListView struct {
	VMs []*minicloudv1.VM
	// ResourceVersion is the list's snapshot; the live stream starts
	// after it, so no change between the two is missed or shown twice.
	ResourceVersion int64
	Form            *createForm
}

func (h *Handler) vmList(w http.ResponseWriter, r *http.Request, s *session) {
	vms, err := client.ListAll(s.ctx, &minicloudv1.ListVMsRequest{}, h.api.VMs.ListVMs, maxListed)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	form, err := h.newCreateForm(s)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	h.render(w, r, http.StatusOK, "vms", s, vmListView{VMs: vms.GetVms(), ResourceVersion: vms.GetResourceVersion(), Form: form})
}

// newCreateForm is an empty form with the choices the user can see.
func (h *Handler) newCreateForm(s *session) (*createForm, error) {
	f := &createForm{RequestID: uuid.NewString(), Errors: map[string]string{}}
	images, err := client.ListAll(s.ctx, &minicloudv1.ListImagesRequest{}, h.api.Images.ListImages, maxListed)
	if err != nil {
		return nil, err
	}
	flavors, err := client.ListAll(s.ctx, &minicloudv1.ListFlavorsRequest{}, h.api.Flavors.ListFlavors, maxListed)
	if err != nil {
		return nil, err
	}
	networks, err := client.ListAll(s.ctx, &minicloudv1.ListNetworksRequest{}, h.api.Networks.ListNetworks, maxListed)
	if err != nil {
		return nil, err
	}
	f.Images, f.Flavors, f.Networks = images.GetImages(), flavors.GetFlavors(), networks.GetNetworks()
	return f, nil
}

// maxFormBytes bounds a create form (an SSH key and a few names).
const maxFormBytes = 64 << 10

// vmCreate creates a VM from the form. The API validates, exactly as for
// the CLI; its message is shown next to the field it names.
func (h *Handler) vmCreate(w http.ResponseWriter, r *http.Request, s *session) {
	r.Body = http.MaxBytesReader(w, r.Body, maxFormBytes)
	if err := r.ParseForm(); err != nil {
		h.fail(w, r, errdefs.Invalid("the form could not be read: %v", err))
		return
	}
	form, err := h.newCreateForm(s)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	form.Name, form.Image, form.Flavor = r.PostFormValue("name"), r.PostFormValue("image"), r.PostFormValue("flavor")
	form.Network, form.SSHKey = r.PostFormValue("network"), strings.TrimSpace(r.PostFormValue("ssh_key"))
	if id := r.PostFormValue("request_id"); id != "" {
		form.RequestID = id
	}
	spec := &minicloudv1.VMSpec{Image: form.Image, Flavor: form.Flavor}
	if form.Network != "" {
		spec.Networks = []string{form.Network}
	}
	if form.SSHKey != "" {
		spec.SshPublicKeys = []string{form.SSHKey}
	}
	_, err = h.api.VMs.CreateVM(s.ctx, &minicloudv1.CreateVMRequest{Name: form.Name, Spec: spec, RequestId: form.RequestID})
	if err != nil {
		if status := errorStatus(err); status >= 500 {
			h.fail(w, r, err)
			return
		}
		form.Errors[fieldOf(err.Error())] = err.Error()
		h.answerForm(w, r, s, http.StatusUnprocessableEntity, form)
		return
	}
	if r.Header.Get("HX-Request") != "true" {
		http.Redirect(w, r, "/vms/"+url.PathEscape(form.Name), http.StatusSeeOther)
		return
	}
	// The new VM reaches the list through the live stream; the form is
	// emptied for the next one.
	next, err := h.newCreateForm(s)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	next.Created = form.Name
	h.answerForm(w, r, s, http.StatusOK, next)
}

// answerForm sends the form back: alone to htmx (which swaps it in place;
// it swaps only 2xx answers, so an error is a 200 there), else in the page.
func (h *Handler) answerForm(w http.ResponseWriter, r *http.Request, s *session, status int, form *createForm) {
	if r.Header.Get("HX-Request") == "true" {
		h.writeFragment(w, r, "createform", form)
		return
	}
	vms, err := client.ListAll(s.ctx, &minicloudv1.ListVMsRequest{}, h.api.VMs.ListVMs, maxListed)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	h.render(w, r, status, "vms", s, vmListView{VMs: vms.GetVms(), ResourceVersion: vms.GetResourceVersion(), Form: form})
}

// fieldPrefixes map the start of an API message to the form field it is
// about. The API's messages name what they refuse first ("vm name ... is
// not a DNS label", "image x not found", "spec.ssh_public_keys[0] ...").
var fieldPrefixes = []struct{ prefix, field string }{
	{"vm name", "name"},
	{"vm ", "name"},
	{"image", "image"},
	{"flavor", "flavor"},
	{"network", "network"},
	{"spec.networks", "network"},
	{"spec.ssh_public_keys", "ssh_key"},
	{"ssh", "ssh_key"},
}

// fieldOf is the form field an API message is about, "" for the form.
func fieldOf(msg string) string {
	for _, p := range fieldPrefixes {
		if strings.HasPrefix(msg, p.prefix) {
			return p.field
		}
	}
	return ""
}

// vmView is the VM page.
type vmView struct {
	VM         *minicloudv1.VM
	Events     []*minicloudv1.Event
	ConsoleLog string
	// ConsoleError says why the console log is not shown.
	ConsoleError string
}

// consoleTailBytes is how much of the serial console the page shows.
const consoleTailBytes = 64 << 10

func (h *Handler) vmPage(w http.ResponseWriter, r *http.Request, s *session) {
	v, err := h.vmDetail(s, r.PathValue("name"))
	if err != nil {
		h.fail(w, r, err)
		return
	}
	v.ConsoleLog, v.ConsoleError = h.consoleLog(s, v.VM.GetMeta().GetName())
	h.render(w, r, http.StatusOK, "vm", s, v)
}

// vmDetail reads a VM and its event timeline.
func (h *Handler) vmDetail(s *session, name string) (*vmView, error) {
	vm, err := h.api.VMs.GetVM(s.ctx, &minicloudv1.GetVMRequest{Name: name})
	if err != nil {
		return nil, err
	}
	return h.vmDetailOf(s, vm)
}

func (h *Handler) vmDetailOf(s *session, vm *minicloudv1.VM) (*vmView, error) {
	events, err := h.api.VMs.ListVMEvents(s.ctx, &minicloudv1.ListVMEventsRequest{Name: vm.GetMeta().GetId()})
	if err != nil && !errdefs.IsNotFound(err) {
		return nil, err
	}
	return &vmView{VM: vm, Events: events.GetEvents()}, nil
}

func (h *Handler) consoleLog(s *session, name string) (string, string) {
	resp, err := h.api.VMs.GetConsoleLog(s.ctx, &minicloudv1.GetConsoleLogRequest{Name: name, TailBytes: consoleTailBytes})
	if err != nil {
		return "", err.Error()
	}
	return strings.ToValidUTF8(string(resp.GetData()), "\uFFFD"), ""
}

// vmConsoleLog answers the console log panel's refresh.
func (h *Handler) vmConsoleLog(w http.ResponseWriter, r *http.Request, s *session) {
	var v vmView
	v.ConsoleLog, v.ConsoleError = h.consoleLog(s, r.PathValue("name"))
	h.writeFragment(w, r, "consolelog", v)
}

// vmAction starts, stops, reboots or deletes a VM. The page follows the
// VM's phase through the live stream; the answer only says the request
// was taken, or the API's refusal.
func (h *Handler) vmAction(w http.ResponseWriter, r *http.Request, s *session) {
	name := r.PathValue("name")
	req := &minicloudv1.VMActionRequest{Name: name}
	var err error
	switch action := r.PathValue("action"); action {
	case "start":
		_, err = h.api.VMs.StartVM(s.ctx, req)
	case "stop":
		_, err = h.api.VMs.StopVM(s.ctx, req)
	case "reboot":
		_, err = h.api.VMs.RebootVM(s.ctx, req)
	case "delete":
		_, err = h.api.VMs.DeleteVM(s.ctx, &minicloudv1.DeleteVMRequest{Name: name})
	default:
		http.NotFound(w, r)
		return
	}
	if r.Header.Get("HX-Request") != "true" {
		if err != nil {
			h.fail(w, r, err)
			return
		}
		http.Redirect(w, r, "/vms/"+url.PathEscape(name), http.StatusSeeOther)
		return
	}
	msg := actionResult{Action: r.PathValue("action"), VM: name}
	if err != nil {
		msg.Error = err.Error()
	}
	h.writeFragment(w, r, "actionresult", msg)
}

type actionResult struct {
	Action, VM, Error string
}
