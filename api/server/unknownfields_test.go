package server

import (
	"testing"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
)

// TestUnknownFieldsIn: fields unknown to this server are found at any
// depth, in a message, a message field or an element of a list, and named
// by the message that carries them.
func TestUnknownFieldsIn(t *testing.T) {
	unknown := protowire.AppendVarint(protowire.AppendTag(nil, 999, protowire.VarintType), 1)
	with := func(m proto.Message) proto.Message {
		m.ProtoReflect().SetUnknown(unknown)
		return m
	}
	vm := func(addr *minicloudv1.VMAddress, spec *minicloudv1.VMSpec) *minicloudv1.VM {
		return &minicloudv1.VM{
			Meta:   &minicloudv1.ObjectMeta{Name: "web1", Labels: map[string]string{"a": "b"}},
			Spec:   spec,
			Status: &minicloudv1.VMStatus{Addresses: []*minicloudv1.VMAddress{{Ip: "10.0.0.2"}, addr}},
		}
	}
	for _, c := range []struct {
		name string
		m    proto.Message
		want string
	}{
		{"none", vm(&minicloudv1.VMAddress{Ip: "10.0.0.3"}, &minicloudv1.VMSpec{Image: "i"}), ""},
		{"top", with(&minicloudv1.CreateVMRequest{Name: "web1"}), "minicloud.v1.CreateVMRequest"},
		{"message field", vm(&minicloudv1.VMAddress{}, with(&minicloudv1.VMSpec{Image: "i"}).(*minicloudv1.VMSpec)), "minicloud.v1.VMSpec"},
		{"list element", vm(with(&minicloudv1.VMAddress{Ip: "10.0.0.3"}).(*minicloudv1.VMAddress), &minicloudv1.VMSpec{}), "minicloud.v1.VMAddress"},
	} {
		if got := unknownFieldsIn(c.m.ProtoReflect()); got != c.want {
			t.Errorf("%s: %q, want %q", c.name, got, c.want)
		}
	}
}
