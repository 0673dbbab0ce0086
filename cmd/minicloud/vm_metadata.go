package main

import (
	"fmt"
	"io"
	"maps"
	"os"
	"slices"
	"strings"

	"github.com/spf13/cobra"
	"golang.org/x/crypto/ssh"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
)

// guestMetadataFlags are the flags that give a VM labels, tags and custom
// metadata; vm create and vm set share them.
type guestMetadataFlags struct {
	labels, tags, metadata, metadataFiles []string
}

func (g *guestMetadataFlags) add(cmd *cobra.Command) {
	f := cmd.Flags()
	f.StringArrayVar(&g.labels, "label", nil, "label KEY=VALUE, served as an EC2 instance tag (repeatable)")
	f.StringArrayVar(&g.tags, "tag", nil, "network-style tag, served in GCE instance/tags (repeatable)")
	f.StringArrayVar(&g.metadata, "metadata", nil, "custom metadata KEY=VALUE, served in GCE instance/attributes/ and OpenStack meta (repeatable)")
	f.StringArrayVar(&g.metadataFiles, "metadata-from-file", nil, "custom metadata KEY=FILE: the value is the file's content (repeatable)")
}

// parse returns the labels and the metadata (from values and files).
func (g *guestMetadataFlags) parse() (labels, metadata map[string]string, err error) {
	if labels, err = keyValues("--label", g.labels); err != nil {
		return nil, nil, err
	}
	if metadata, err = keyValues("--metadata", g.metadata); err != nil {
		return nil, nil, err
	}
	files, err := keyValues("--metadata-from-file", g.metadataFiles)
	if err != nil {
		return nil, nil, err
	}
	for k, path := range files {
		if _, dup := metadata[k]; dup {
			return nil, nil, usagef("metadata %s is given by both --metadata and --metadata-from-file", k)
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return nil, nil, usagef("--metadata-from-file %s: %v", k, err)
		}
		if metadata == nil {
			metadata = map[string]string{}
		}
		metadata[k] = string(b)
	}
	return labels, metadata, nil
}

// keyValues parses repeated KEY=VALUE flags; a key given twice is refused.
func keyValues(flag string, items []string) (map[string]string, error) {
	if len(items) == 0 {
		return nil, nil
	}
	out := make(map[string]string, len(items))
	for _, it := range items {
		k, v, ok := strings.Cut(it, "=")
		if !ok || k == "" {
			return nil, usagef("%s %q: use KEY=VALUE", flag, it)
		}
		if _, dup := out[k]; dup {
			return nil, usagef("%s: key %s is given twice", flag, k)
		}
		out[k] = v
	}
	return out, nil
}

func (a *app) newVMSetCommand(complete cobra.CompletionFunc) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "set NAME [--label K=V] [--unset-label K] [--tag T] [--remove-tag T] [--metadata K=V] [--unset-metadata K] [--add-ssh-key FILE] [--remove-ssh-key FINGERPRINT]",
		Short: "Change a VM's labels, tags, metadata and SSH keys while it runs",
		Long: `Change what a VM may learn about itself. The guest sees the change within
a second in every metadata tree (a GCE wait_for_change returns); the domain
is not touched. The config drive keeps what it was written with at create.

With --resource-version the change is made only if the VM is still at that
version (see ` + "`minicloud vm show -o json`" + `); otherwise it fails with exit 5.`,
		Args:              exactArgs("NAME"),
		ValidArgsFunction: complete,
	}
	var g guestMetadataFlags
	g.add(cmd)
	f := cmd.Flags()
	unsetLabels := f.StringArray("unset-label", nil, "remove label KEY (repeatable)")
	removeTags := f.StringArray("remove-tag", nil, "remove tag T (repeatable)")
	unsetMetadata := f.StringArray("unset-metadata", nil, "remove metadata KEY (repeatable)")
	addKeys := f.StringArray("add-ssh-key", nil, "file of SSH public keys to add, one per line (repeatable)")
	removeKeys := f.StringArray("remove-ssh-key", nil, "remove the SSH key with this fingerprint (SHA256:..., as `ssh-keygen -lf` prints it; repeatable)")
	version := f.Int64("resource-version", 0, "only change the VM if it is still at this resource version")
	out := addOutputFlag(cmd)
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		labels, metadata, err := g.parse()
		if err != nil {
			return err
		}
		req := &minicloudv1.UpdateVMMetadataRequest{
			Name: args[0], Project: a.project(), ResourceVersion: *version,
			SetLabels: labels, RemoveLabels: *unsetLabels,
			AddTags: g.tags, RemoveTags: *removeTags,
			SetMetadata: metadata, RemoveMetadata: *unsetMetadata,
			RemoveSshKeys: *removeKeys,
		}
		for _, path := range *addKeys {
			k, err := readSSHKeys(path)
			if err != nil {
				return err
			}
			req.AddSshKeys = append(req.AddSshKeys, k...)
		}
		if len(req.SetLabels)+len(req.RemoveLabels)+len(req.AddTags)+len(req.RemoveTags)+len(req.SetMetadata)+
			len(req.RemoveMetadata)+len(req.AddSshKeys)+len(req.RemoveSshKeys) == 0 {
			return usagef("nothing to change: give at least one of --label, --unset-label, --tag, --remove-tag, --metadata, --metadata-from-file, --unset-metadata, --add-ssh-key, --remove-ssh-key")
		}
		c, err := a.connect(cmd.Context())
		if err != nil {
			return err
		}
		vm, err := c.VMs.UpdateVMMetadata(cmd.Context(), req)
		if err != nil {
			return err
		}
		return printMessage(a.out, *out, vm, func(w io.Writer) error {
			_, err := fmt.Fprintf(w, "vm %s updated (resource version %d)\n", args[0], vm.GetMeta().GetResourceVersion())
			return err
		})
	}
	return cmd
}

// guestMetadataDetails writes the labels, tags, metadata and SSH keys
// sections of vm show.
func guestMetadataDetails(w io.Writer, vm *minicloudv1.VM) error {
	if labels := vm.GetMeta().GetLabels(); len(labels) > 0 {
		fmt.Fprintln(w, "\nLabels:")
		var rows [][]string
		for _, k := range slices.Sorted(maps.Keys(labels)) {
			rows = append(rows, []string{"  " + k, labels[k]})
		}
		if err := writeTable(w, []string{"  KEY", "VALUE"}, rows); err != nil {
			return err
		}
	}
	if md := vm.GetSpec().GetMetadata(); len(md) > 0 {
		fmt.Fprintln(w, "\nMetadata:")
		var rows [][]string
		for _, k := range slices.Sorted(maps.Keys(md)) {
			rows = append(rows, []string{"  " + k, bytesIEC(int64(len(md[k]))), preview(md[k])})
		}
		if err := writeTable(w, []string{"  KEY", "SIZE", "VALUE"}, rows); err != nil {
			return err
		}
	}
	if keys := vm.GetSpec().GetSshPublicKeys(); len(keys) > 0 {
		fmt.Fprintln(w, "\nSSH keys:")
		var rows [][]string
		for _, k := range keys {
			pub, comment, _, _, err := ssh.ParseAuthorizedKey([]byte(k))
			if err != nil {
				rows = append(rows, []string{"  ?", "-", "-"})
				continue
			}
			rows = append(rows, []string{"  " + pub.Type(), ssh.FingerprintSHA256(pub), orDash(comment)})
		}
		if err := writeTable(w, []string{"  TYPE", "FINGERPRINT", "COMMENT"}, rows); err != nil {
			return err
		}
	}
	return nil
}

// preview is the first line of v, at most 48 characters.
func preview(v string) string {
	line, _, more := strings.Cut(v, "\n")
	if r := []rune(line); len(r) > 48 {
		line, more = string(r[:48]), true
	}
	if more {
		line += "…"
	}
	return orDash(line)
}
