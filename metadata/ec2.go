package metadata

import (
	"crypto"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
)

// EC2Versions are the dated API versions EC2 lists at "/", oldest first;
// every one serves the same tree. cloud-init 22.4 probes 2021-03-23,
// 2018-09-24 and 2016-09-02 before falling back to 2009-04-04, and its
// OpenStack datasource reads 2009-04-04.
var EC2Versions = []string{
	"1.0", "2007-01-19", "2007-03-01", "2007-08-29", "2007-10-10", "2007-12-15",
	"2008-02-01", "2008-09-01", "2009-04-04", "2011-01-01", "2011-05-01",
	"2012-01-12", "2014-02-25", "2014-11-05", "2015-10-20", "2016-04-19",
	"2016-06-30", "2016-09-02", "2018-03-28", "2018-08-17", "2018-09-24",
	"2019-10-01", "2020-10-27", "2021-01-03", "2021-03-23", "2021-07-15",
	"2022-09-24",
}

var (
	ec2VersionSet     = toSet(append(append([]string(nil), EC2Versions...), "latest"))
	ec2VersionListing = []byte(strings.Join(EC2Versions, "\n") + "\nlatest")
)

func toSet(xs []string) map[string]bool {
	m := make(map[string]bool, len(xs))
	for _, x := range xs {
		m[x] = true
	}
	return m
}

// ec2Tree renders what EC2 serves below "/<version>/": meta-data/,
// user-data (only when there is some) and dynamic/. signer, if set, signs the
// instance identity document.
func ec2Tree(inst *Instance, signer crypto.Signer) (*node, error) {
	root := buildDir()
	dyn, err := ec2Dynamic(inst, signer)
	if err != nil {
		return nil, err
	}
	root.add("dynamic", dyn)
	root.add("meta-data", ec2MetaData(inst))
	if inst.UserData != nil {
		root.add("user-data", leaf(inst.UserData, "application/octet-stream"))
	}
	return root.done(), nil
}

func ec2MetaData(inst *Instance) *node {
	p := inst.Primary()
	md := buildDir()
	md.add("ami-id", textLeaf(inst.Image))
	md.add("ami-launch-index", textLeaf(strconv.Itoa(inst.LaunchIndex)))
	md.add("ami-manifest-path", textLeaf("(unknown)"))
	md.add("block-device-mapping", buildDir().
		add("ami", textLeaf("vda")).
		add("root", textLeaf("/dev/vda")).done())
	md.add("hostname", textLeaf(inst.FQDN()))
	md.add("instance-action", textLeaf("none"))
	md.add("instance-id", textLeaf(inst.ID))
	md.add("instance-life-cycle", textLeaf("on-demand"))
	md.add("instance-type", textLeaf(inst.InstanceType))
	md.add("local-hostname", textLeaf(inst.FQDN()))
	if p.Address.IsValid() {
		md.add("local-ipv4", textLeaf(p.Address.Addr().String()))
	}
	if p.MAC != nil {
		md.add("mac", textLeaf(p.MAC.String()))
	}
	if len(inst.Interfaces) > 0 {
		macs := buildDir()
		for i, nic := range inst.Interfaces {
			macs.add(nic.MAC.String(), ec2Interface(inst, i, nic))
		}
		md.add("network", buildDir().add("interfaces", buildDir().add("macs", macs.done()).done()).done())
	}
	md.add("placement", buildDir().
		add("availability-zone", textLeaf(inst.AvailabilityZone)).
		add("region", textLeaf(inst.Region)).done())
	if len(inst.SSHKeys) > 0 {
		keys := buildDir()
		for i, k := range inst.SSHKeys {
			idx := strconv.Itoa(i)
			keys.addListed(idx, idx+"="+k.Name, buildDir().add("openssh-key", textLeaf(k.Key+"\n")).done())
		}
		md.add("public-keys", keys.done())
	}
	md.add("security-groups", textLeaf("default"))
	md.add("services", buildDir().
		add("domain", textLeaf(inst.Domain)).
		add("partition", textLeaf("minicloud")).done())
	if tags := ec2Tags(inst); tags != nil {
		md.add("tags", buildDir().add("instance", tags).done())
	}
	return md.done()
}

func ec2Interface(inst *Instance, i int, nic Interface) *node {
	subnet := nic.Address.Masked().String()
	d := buildDir()
	d.add("device-number", textLeaf(strconv.Itoa(i)))
	d.add("interface-id", textLeaf("eni-"+shortID(inst.ID)+strconv.Itoa(i)))
	d.add("local-hostname", textLeaf(inst.FQDN()))
	d.add("local-ipv4s", textLeaf(nic.Address.Addr().String()))
	d.add("mac", textLeaf(nic.MAC.String()))
	d.add("owner-id", textLeaf(inst.Project))
	d.add("security-group-ids", textLeaf("default"))
	d.add("subnet-id", textLeaf("subnet-"+nic.Network))
	d.add("subnet-ipv4-cidr-block", textLeaf(subnet))
	d.add("vpc-id", textLeaf("vpc-"+nic.Network))
	d.add("vpc-ipv4-cidr-block", textLeaf(subnet))
	d.add("vpc-ipv4-cidr-blocks", textLeaf(subnet))
	return d.done()
}

// ec2Tags serves labels as instance tags; keys that cannot be one path
// segment are left out.
func ec2Tags(inst *Instance) *node {
	if len(inst.Labels) == 0 {
		return nil
	}
	d := buildDir()
	for _, k := range slices.Sorted(maps.Keys(inst.Labels)) {
		if k == "" || strings.ContainsAny(k, "/ ") || k == "." || k == ".." {
			continue
		}
		d.add(k, textLeaf(inst.Labels[k]))
	}
	return d.done()
}

func shortID(id string) string {
	s := strings.ReplaceAll(id, "-", "")
	if len(s) > 8 {
		s = s[:8]
	}
	return s
}

// identityDocument has the fields and order of EC2's
// dynamic/instance-identity/document.
type identityDocument struct {
	AccountID               string   `json:"accountId"`
	Architecture            string   `json:"architecture"`
	AvailabilityZone        string   `json:"availabilityZone"`
	BillingProducts         []string `json:"billingProducts"`
	DevpayProductCodes      []string `json:"devpayProductCodes"`
	MarketplaceProductCodes []string `json:"marketplaceProductCodes"`
	ImageID                 string   `json:"imageId"`
	InstanceID              string   `json:"instanceId"`
	InstanceType            string   `json:"instanceType"`
	KernelID                *string  `json:"kernelId"`
	PendingTime             string   `json:"pendingTime"`
	PrivateIP               string   `json:"privateIp"`
	RamdiskID               *string  `json:"ramdiskId"`
	Region                  string   `json:"region"`
	Version                 string   `json:"version"`
}

func ec2Dynamic(inst *Instance, signer crypto.Signer) (*node, error) {
	doc := identityDocument{
		AccountID:        inst.Project,
		Architecture:     "x86_64",
		AvailabilityZone: inst.AvailabilityZone,
		ImageID:          inst.Image,
		InstanceID:       inst.ID,
		InstanceType:     inst.InstanceType,
		Region:           inst.Region,
		Version:          "2017-09-30",
	}
	if !inst.LaunchTime.IsZero() {
		doc.PendingTime = inst.LaunchTime.Format("2006-01-02T15:04:05Z")
	}
	if p := inst.Primary(); p.Address.IsValid() {
		doc.PrivateIP = p.Address.Addr().String()
	}
	body, err := json.MarshalIndent(doc, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("identity document: %w", err)
	}
	id := buildDir().add("document", leaf(body, "text/plain"))
	if signer != nil {
		sig, err := SignIdentityDocument(signer, body)
		if err != nil {
			return nil, err
		}
		id.add("signature", textLeaf(base64.StdEncoding.EncodeToString(sig)))
	}
	return buildDir().add("instance-identity", id.done()).done(), nil
}

// SignIdentityDocument signs doc with the cloud's key: Ed25519 over the bytes,
// RSA PKCS#1 v1.5 over their SHA-256 (as EC2's "signature"). Verify with
// VerifyIdentityDocument.
func SignIdentityDocument(signer crypto.Signer, doc []byte) ([]byte, error) {
	switch signer.Public().(type) {
	case ed25519.PublicKey:
		return signer.Sign(rand.Reader, doc, crypto.Hash(0))
	case *rsa.PublicKey:
		sum := sha256.Sum256(doc)
		return signer.Sign(rand.Reader, sum[:], crypto.SHA256)
	default:
		return nil, fmt.Errorf("sign identity document: unsupported key type %T (use Ed25519 or RSA)", signer.Public())
	}
}

// VerifyIdentityDocument checks a signature made by SignIdentityDocument.
func VerifyIdentityDocument(pub crypto.PublicKey, doc, sig []byte) error {
	switch k := pub.(type) {
	case ed25519.PublicKey:
		if !ed25519.Verify(k, doc, sig) {
			return fmt.Errorf("identity document: bad Ed25519 signature")
		}
		return nil
	case *rsa.PublicKey:
		sum := sha256.Sum256(doc)
		return rsa.VerifyPKCS1v15(k, crypto.SHA256, sum[:], sig)
	default:
		return fmt.Errorf("identity document: unsupported key type %T", pub)
	}
}

// EC2MetaDataJSON renders the meta-data tree as one JSON object, as Nova
// writes ec2/latest/meta-data.json on config drives.
func EC2MetaDataJSON(inst *Instance) ([]byte, error) {
	return json.MarshalIndent(nodeToJSON(ec2MetaData(inst)), "", "  ")
}

func nodeToJSON(n *node) any {
	if !n.dir {
		return string(n.body)
	}
	m := make(map[string]any, len(n.children))
	for name, c := range n.children {
		m[name] = nodeToJSON(c)
	}
	return m
}
