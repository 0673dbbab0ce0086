package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"

	"github.com/spf13/cobra"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/client"
	"github.com/minicloud/minicloud/pkg/errdefs"
)

// uploadChunkSize is the data per CreateImage message (under gRPC's 4 MiB
// default message limit).
const uploadChunkSize = 1 << 20

func (a *app) newImageCommand() *cobra.Command {
	cmd := groupCommand(&cobra.Command{Use: "image", Short: "Manage guest images"})
	complete := a.completeNames(func(ctx context.Context, c *client.Client) ([]string, error) {
		resp, err := client.ListAll(ctx, &minicloudv1.ListImagesRequest{Project: a.project()}, c.Images.ListImages, 0)
		var names []string
		for _, i := range resp.GetImages() {
			names = append(names, i.GetMeta().GetName())
		}
		return names, err
	})

	create := &cobra.Command{
		Use:   "create NAME --file PATH [--kernel PATH --initrd PATH --cmdline S]",
		Short: "Upload an image (qcow2 or raw, detected from the content)",
		Args:  exactArgs("NAME"),
	}
	var file, kernel, initrd string
	var hdr minicloudv1.CreateImageHeader
	create.Flags().StringVar(&file, "file", "", "disk image (qcow2 or raw)")
	create.Flags().StringVar(&kernel, "kernel", "", "kernel for direct boot")
	create.Flags().StringVar(&initrd, "initrd", "", "initrd for direct boot (needs --kernel)")
	create.Flags().StringVar(&hdr.Cmdline, "cmdline", "", "kernel command line for direct boot (needs --kernel)")
	create.Flags().Int64Var(&hdr.MinDiskGib, "min-disk-gib", 0, "smallest root disk the image needs (default: its virtual size)")
	create.Flags().StringVar(&hdr.RequiredHypervisor, "required-hypervisor", "", "kvm or tcg if the image only runs on one")
	create.Flags().StringVar(&hdr.DefaultUser, "default-user", "", "account `minicloud vm ssh` logs in as (\"debian\" for Debian cloud images; default root)")
	format := create.Flags().String("format", "", "raw or qcow2: refuse the upload unless the server finds the disk is that format (default: detected)")
	public := create.Flags().Bool("public", false, "make the image public once uploaded (every project may boot from it; admin)")
	createOut := addOutputFlag(create)
	create.RunE = func(cmd *cobra.Command, args []string) error {
		if err := requireFlags(cmd, "file"); err != nil {
			return err
		}
		if kernel == "" && (initrd != "" || hdr.Cmdline != "") {
			return usagef("--initrd and --cmdline need --kernel")
		}
		switch *format {
		case "":
		case "raw":
			hdr.Format = minicloudv1.ImageFormat_IMAGE_FORMAT_RAW
		case "qcow2":
			hdr.Format = minicloudv1.ImageFormat_IMAGE_FORMAT_QCOW2
		default:
			return usagef("--format must be raw or qcow2, got %q", *format)
		}
		c, err := a.connect(cmd.Context())
		if err != nil {
			return err
		}
		hdr.Name, hdr.Project = args[0], a.project()
		img, err := a.uploadImage(cmd.Context(), c, &hdr, file, kernel, initrd)
		if err != nil {
			return err
		}
		if *public {
			if img, err = c.Images.SetImageVisibility(cmd.Context(), &minicloudv1.SetImageVisibilityRequest{
				Name: hdr.Name, Project: hdr.Project, Visibility: minicloudv1.ImageVisibility_IMAGE_VISIBILITY_PUBLIC,
			}); err != nil {
				return fmt.Errorf("image %s uploaded (private), but not made public: %w", hdr.Name, err)
			}
		}
		return printMessage(a.out, *createOut, img, func(w io.Writer) error { return imageTable(w, []*minicloudv1.Image{img}) })
	}

	list := listCommand(a, "List images",
		func(ctx context.Context, c *client.Client) (*minicloudv1.ListImagesResponse, error) {
			return client.ListAll(ctx, &minicloudv1.ListImagesRequest{Project: a.project()}, c.Images.ListImages, 0)
		},
		func(w io.Writer, r *minicloudv1.ListImagesResponse) error { return imageTable(w, r.GetImages()) })
	show := showCommand(a, "Show an image", complete,
		func(ctx context.Context, c *client.Client, name string) (*minicloudv1.Image, error) {
			return c.Images.GetImage(ctx, &minicloudv1.GetImageRequest{Name: name, Project: a.project()})
		}, imageDetails)
	del := nameCommand(a, "delete", "Delete an image no VM uses", "image", "deleted", complete,
		func(ctx context.Context, c *client.Client, name string) error {
			return ignoreResult(c.Images.DeleteImage(ctx, &minicloudv1.DeleteImageRequest{Name: name, Project: a.project()}))
		})
	visibility := &cobra.Command{
		Use:               "set-visibility NAME public|private",
		Short:             "Make an image of your project public (admin) or private again",
		Args:              exactArgs("NAME", "VISIBILITY"),
		ValidArgsFunction: complete,
	}
	visibilityOut := addOutputFlag(visibility)
	visibility.RunE = func(cmd *cobra.Command, args []string) error {
		v, ok := map[string]minicloudv1.ImageVisibility{
			"public":  minicloudv1.ImageVisibility_IMAGE_VISIBILITY_PUBLIC,
			"private": minicloudv1.ImageVisibility_IMAGE_VISIBILITY_PRIVATE,
		}[args[1]]
		if !ok {
			return usagef("visibility %q: must be public or private", args[1])
		}
		c, err := a.connect(cmd.Context())
		if err != nil {
			return err
		}
		img, err := c.Images.SetImageVisibility(cmd.Context(), &minicloudv1.SetImageVisibilityRequest{Name: args[0], Project: a.project(), Visibility: v})
		if err != nil {
			return err
		}
		return printMessage(a.out, *visibilityOut, img, func(w io.Writer) error { return imageTable(w, []*minicloudv1.Image{img}) })
	}
	cmd.AddCommand(create, list, show, del, visibility)
	return cmd
}

// imageVisibility names an image's visibility; an image of no project
// (from before images had owners) is public.
func imageVisibility(i *minicloudv1.Image) string {
	if i.GetMeta().GetProject() == "" || i.GetVisibility() == minicloudv1.ImageVisibility_IMAGE_VISIBILITY_PUBLIC {
		return "public"
	}
	return "private"
}

// imagePart is one file to upload.
type imagePart struct {
	part minicloudv1.ImagePart
	path string
	f    *os.File
	size int64
	sum  string // hex sha256, known after sending
}

// uploadImage streams the header and the parts, and checks that the server
// stored exactly the bytes that were read (same sha256).
func (a *app) uploadImage(ctx context.Context, c *client.Client, hdr *minicloudv1.CreateImageHeader, disk, kernel, initrd string) (_ *minicloudv1.Image, err error) {
	var parts []*imagePart
	for _, p := range []imagePart{
		{part: minicloudv1.ImagePart_IMAGE_PART_DISK, path: disk},
		{part: minicloudv1.ImagePart_IMAGE_PART_KERNEL, path: kernel},
		{part: minicloudv1.ImagePart_IMAGE_PART_INITRD, path: initrd},
	} {
		if p.path == "" {
			continue
		}
		f, err := os.Open(p.path)
		if err != nil {
			return nil, usagef("%v", err)
		}
		defer f.Close()
		st, err := f.Stat()
		if err != nil {
			return nil, fmt.Errorf("stat %s: %w", p.path, err)
		}
		if !st.Mode().IsRegular() {
			return nil, usagef("%s is not a regular file", p.path)
		}
		p.f, p.size = f, st.Size()
		parts = append(parts, &p)
	}
	var total int64
	for _, p := range parts {
		total += p.size
		switch p.part {
		case minicloudv1.ImagePart_IMAGE_PART_DISK:
			hdr.DiskSizeBytes = p.size
		case minicloudv1.ImagePart_IMAGE_PART_KERNEL:
			hdr.KernelSizeBytes = p.size
		case minicloudv1.ImagePart_IMAGE_PART_INITRD:
			hdr.InitrdSizeBytes = p.size
		}
	}

	ctx, cancel := context.WithCancel(ctx)
	defer cancel() // on failure this tells the server to drop the upload
	stream, err := c.Images.CreateImage(ctx)
	if err != nil {
		return nil, err
	}
	// A failed Send means the server ended the call; CloseAndRecv says why.
	serverErr := func() error {
		_, err := stream.CloseAndRecv()
		if err == nil {
			err = errors.New("server closed the upload early")
		}
		return err
	}
	if err := stream.Send(&minicloudv1.CreateImageRequest{Msg: &minicloudv1.CreateImageRequest_Header{Header: hdr}}); err != nil {
		return nil, serverErr()
	}
	prog := newProgress(a.errOut, a.errIsTerminal, hdr.Name, total)
	defer func() {
		if err != nil {
			prog.abandon()
		}
	}()
	buf := make([]byte, uploadChunkSize)
	for _, p := range parts {
		h := sha256.New()
		for {
			n, rerr := p.f.Read(buf)
			if n > 0 {
				h.Write(buf[:n])
				msg := &minicloudv1.CreateImageRequest{Msg: &minicloudv1.CreateImageRequest_Chunk{Chunk: &minicloudv1.ImageChunk{Part: p.part, Data: buf[:n]}}}
				if err := stream.Send(msg); err != nil {
					return nil, serverErr()
				}
				prog.add(n)
			}
			if errors.Is(rerr, io.EOF) {
				break
			}
			if rerr != nil {
				return nil, fmt.Errorf("read %s: %w", p.path, rerr)
			}
		}
		p.sum = hex.EncodeToString(h.Sum(nil))
	}
	img, err := stream.CloseAndRecv()
	if err != nil {
		return nil, err
	}
	prog.finish()
	for _, p := range parts {
		var stored *minicloudv1.ImageBlob
		switch p.part {
		case minicloudv1.ImagePart_IMAGE_PART_DISK:
			stored = img.GetDisk()
		case minicloudv1.ImagePart_IMAGE_PART_KERNEL:
			stored = img.GetKernel()
		case minicloudv1.ImagePart_IMAGE_PART_INITRD:
			stored = img.GetInitrd()
		}
		if stored.GetSha256() != p.sum {
			return nil, errdefs.Internal("image %s: server stored %s with sha256 %s, but %s has sha256 %s", hdr.Name, p.path, stored.GetSha256(), p.path, p.sum)
		}
	}
	return img, nil
}

func imageFormat(f minicloudv1.ImageFormat) string {
	switch f {
	case minicloudv1.ImageFormat_IMAGE_FORMAT_QCOW2:
		return "qcow2"
	case minicloudv1.ImageFormat_IMAGE_FORMAT_RAW:
		return "raw"
	}
	return "-"
}

func shortSum(s string) string {
	if len(s) > 12 {
		return s[:12]
	}
	return orDash(s)
}

func imageTable(w io.Writer, images []*minicloudv1.Image) error {
	rows := make([][]string, 0, len(images))
	for _, i := range images {
		boot := "disk"
		if i.GetKernel().GetSha256() != "" {
			boot = "kernel"
		}
		rows = append(rows, []string{
			i.GetMeta().GetName(),
			imageFormat(i.GetFormat()),
			bytesIEC(i.GetDisk().GetSizeBytes()),
			bytesIEC(i.GetVirtualSizeBytes()),
			strconv.FormatInt(i.GetMinDiskGib(), 10),
			boot,
			shortSum(i.GetDisk().GetSha256()),
			orDash(i.GetMeta().GetProject()),
			imageVisibility(i),
			age(i.GetMeta().GetCreateTime()),
		})
	}
	return writeTable(w, []string{"NAME", "FORMAT", "SIZE", "VIRTUAL-SIZE", "MIN-DISK-GIB", "BOOT", "SHA256", "PROJECT", "VISIBILITY", "AGE"}, rows)
}

func imageDetails(w io.Writer, i *minicloudv1.Image) error {
	blob := func(b *minicloudv1.ImageBlob) string {
		if b.GetSha256() == "" {
			return "-"
		}
		return fmt.Sprintf("%s (sha256 %s)", bytesIEC(b.GetSizeBytes()), b.GetSha256())
	}
	return writeFields(w, []field{
		{"Name", i.GetMeta().GetName()},
		{"ID", i.GetMeta().GetId()},
		{"Project", orDash(i.GetMeta().GetProject())},
		{"Visibility", imageVisibility(i)},
		{"Format", imageFormat(i.GetFormat())},
		{"Disk", blob(i.GetDisk())},
		{"Virtual size", bytesIEC(i.GetVirtualSizeBytes())},
		{"Min disk GiB", strconv.FormatInt(i.GetMinDiskGib(), 10)},
		{"Kernel", blob(i.GetKernel())},
		{"Initrd", blob(i.GetInitrd())},
		{"Cmdline", orDash(i.GetCmdline())},
		{"Required hypervisor", orDash(i.GetRequiredHypervisor())},
		{"Default user", orDash(i.GetDefaultUser())},
		{"Created", timestamp(i.GetMeta().GetCreateTime())},
	})
}
