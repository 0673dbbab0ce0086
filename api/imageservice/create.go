package imageservice

import (
	"context"
	"errors"
	"fmt"
	"io"
	"regexp"
	"strings"
	"syscall"

	"github.com/google/uuid"
	clientv3 "go.etcd.io/etcd/client/v3"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
	"github.com/minicloud/minicloud/pkg/imageformat"
	"github.com/minicloud/minicloud/pkg/store"
)

const (
	gib           = 1 << 30
	maxCmdlineLen = 4096
)

// defaultUserRE is a portable user name (useradd's default NAME_REGEX,
// at most 32 characters): it goes on an ssh command line.
var defaultUserRE = regexp.MustCompile(`^[a-z_][a-z0-9_-]{0,31}$`)

// CreateImage receives a header and then chunks of the disk, kernel and
// initrd, stores them as blobs and records the image. On any failure it
// leaves neither a temporary file, nor a new blob, nor a key behind.
func (s *Service) CreateImage(stream minicloudv1.ImageService_CreateImageServer) error {
	ctx := stream.Context()
	first, err := stream.Recv()
	if err != nil {
		if errors.Is(err, io.EOF) {
			return errdefs.Invalid("empty upload: the first message must be a header")
		}
		return err
	}
	hdr := first.GetHeader()
	if hdr == nil {
		return errdefs.Invalid("the first message of an upload must be a header")
	}
	if err := s.validateHeader(hdr); err != nil {
		return err
	}
	project, err := s.projectOf(hdr.GetProject())
	if err != nil {
		return err
	}
	// The room the project has now: the upload stops as soon as it would
	// need more; the commit's transaction decides against the usage then.
	q, err := s.readQuota(ctx, project)
	if err != nil {
		return err
	}
	declared := hdr.GetDiskSizeBytes() + hdr.GetKernelSizeBytes() + hdr.GetInitrdSizeBytes()
	if err := q.check(declared); err != nil {
		return err
	}
	if err := s.checkFree(declared); err != nil {
		return err
	}
	// Fail fast instead of after a long upload; the create-only txn below
	// still decides races.
	if _, _, err := s.get(ctx, hdr.GetName()); err == nil {
		return errdefs.AlreadyExists("image %q already exists", hdr.GetName())
	} else if !errdefs.IsNotFound(err) {
		return err
	}

	up := &upload{s: s, parts: map[minicloudv1.ImagePart]*blobWriter{}, quota: q}
	defer up.abort()
	if err := up.receive(stream); err != nil {
		return err
	}
	img, err := up.describe(hdr)
	if err != nil {
		return err
	}
	img.Meta.Project = project
	img.Visibility = minicloudv1.ImageVisibility_IMAGE_VISIBILITY_PRIVATE
	return up.commit(ctx, img, stream)
}

func (s *Service) validateHeader(h *minicloudv1.CreateImageHeader) error {
	if err := validateName(h.GetName()); err != nil {
		return err
	}
	switch h.GetRequiredHypervisor() {
	case "", "kvm", "tcg":
	default:
		return errdefs.Invalid("required_hypervisor %q must be empty, kvm or tcg", h.GetRequiredHypervisor())
	}
	if u := h.GetDefaultUser(); u != "" && !defaultUserRE.MatchString(u) {
		return errdefs.Invalid("default_user %q is not a POSIX user name: use 1-32 lowercase letters, digits, '_' and '-', starting with a letter or '_'", u)
	}
	if h.GetMinDiskGib() < 0 {
		return errdefs.Invalid("min_disk_gib must not be negative")
	}
	if len(h.GetCmdline()) > maxCmdlineLen {
		return errdefs.Invalid("cmdline is %d bytes, at most %d allowed", len(h.GetCmdline()), maxCmdlineLen)
	}
	for _, n := range []int64{h.GetDiskSizeBytes(), h.GetKernelSizeBytes(), h.GetInitrdSizeBytes()} {
		if n < 0 {
			return errdefs.Invalid("sizes in the header must not be negative")
		}
	}
	total := h.GetDiskSizeBytes() + h.GetKernelSizeBytes() + h.GetInitrdSizeBytes()
	if total > s.maxBytes || total < 0 {
		return errdefs.ResourceExhausted("image %q is %d bytes, more than the limit of %d bytes", h.GetName(), total, s.maxBytes)
	}
	return nil
}

// upload is one CreateImage call in progress: one temporary blob per part.
type upload struct {
	s     *Service
	parts map[minicloudv1.ImagePart]*blobWriter
	total int64
	// created are blobs this upload added to the directory (not dedup hits).
	created []string
	// quota is the owner project's image room when the upload began.
	quota uploadQuota
}

func (u *upload) receive(stream minicloudv1.ImageService_CreateImageServer) error {
	for {
		msg, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		chunk := msg.GetChunk()
		if chunk == nil {
			return errdefs.Invalid("only the first message of an upload may be a header")
		}
		w, err := u.writer(stream.Context(), chunk.GetPart())
		if err != nil {
			return err
		}
		u.total += int64(len(chunk.GetData()))
		if u.total > u.s.maxBytes {
			return errdefs.ResourceExhausted("upload exceeds the limit of %d bytes", u.s.maxBytes)
		}
		// Before the chunk is written: nothing beyond the quota reaches
		// the disk, and abort removes what did.
		if err := u.quota.check(u.total); err != nil {
			return err
		}
		if err := u.s.checkFree(int64(len(chunk.GetData()))); err != nil {
			return err
		}
		if _, err := w.Write(chunk.GetData()); err != nil {
			if errors.Is(err, syscall.ENOSPC) {
				return errdefs.ResourceExhausted("the image store is out of space")
			}
			return errdefs.Wrap(errdefs.KindUnavailable, err, "store upload")
		}
	}
}

func (u *upload) writer(ctx context.Context, part minicloudv1.ImagePart) (*blobWriter, error) {
	if w, ok := u.parts[part]; ok {
		return w, nil
	}
	switch part {
	case minicloudv1.ImagePart_IMAGE_PART_DISK, minicloudv1.ImagePart_IMAGE_PART_KERNEL, minicloudv1.ImagePart_IMAGE_PART_INITRD:
	default:
		return nil, errdefs.Invalid("chunk part must be disk, kernel or initrd")
	}
	// Registered before the file exists, so garbage collection (which
	// lists files before keys) never sees the file without its key.
	name, err := u.s.registerUpload(ctx)
	if err != nil {
		return nil, err
	}
	w, err := u.s.blobs.create(name)
	if err != nil {
		u.s.unregisterUpload(name)
		return nil, errdefs.Wrap(errdefs.KindUnavailable, err, "store upload")
	}
	u.parts[part] = w
	return w, nil
}

// describe validates what arrived and builds the image record (without
// blob digests, which commit fills in).
func (u *upload) describe(h *minicloudv1.CreateImageHeader) (*minicloudv1.Image, error) {
	disk := u.parts[minicloudv1.ImagePart_IMAGE_PART_DISK]
	kernel := u.parts[minicloudv1.ImagePart_IMAGE_PART_KERNEL]
	initrd := u.parts[minicloudv1.ImagePart_IMAGE_PART_INITRD]
	if disk == nil || disk.size == 0 {
		return nil, errdefs.Invalid("image %q has no disk data", h.GetName())
	}
	if kernel == nil && (initrd != nil || h.GetCmdline() != "") {
		return nil, errdefs.Invalid("an initrd or cmdline needs a kernel")
	}
	for _, c := range []struct {
		part     string
		w        *blobWriter
		declared int64
	}{
		{"disk", disk, h.GetDiskSizeBytes()},
		{"kernel", kernel, h.GetKernelSizeBytes()},
		{"initrd", initrd, h.GetInitrdSizeBytes()},
	} {
		var got int64
		if c.w != nil {
			got = c.w.size
		}
		if c.declared != 0 && got != c.declared {
			return nil, errdefs.Invalid("%s: received %d bytes, header announced %d (upload interrupted?)", c.part, got, c.declared)
		}
	}

	info, err := imageformat.Probe(disk.f, disk.size)
	if err != nil {
		var inv *imageformat.InvalidError
		if errors.As(err, &inv) {
			return nil, errdefs.Invalid("image %q: %s", h.GetName(), inv.Reason)
		}
		return nil, fmt.Errorf("probe image %s: %w", h.GetName(), err)
	}
	format := minicloudv1.ImageFormat_IMAGE_FORMAT_RAW
	if info.Format == imageformat.QCOW2 {
		format = minicloudv1.ImageFormat_IMAGE_FORMAT_QCOW2
	}
	// A raw disk can hold a qcow2 image at its start (a guest's own image
	// file): the uploader's word decides which one is meant.
	if declared := h.GetFormat(); declared != minicloudv1.ImageFormat_IMAGE_FORMAT_UNSPECIFIED && declared != format {
		return nil, errdefs.Invalid("image %q: declared %s, but the disk is %s", h.GetName(), formatName(declared), info.Format)
	}
	// The guest disk can never be smaller than the image's virtual size.
	needGiB := (info.VirtualSize + gib - 1) / gib
	minDisk := h.GetMinDiskGib()
	if minDisk == 0 {
		minDisk = needGiB
	} else if minDisk < needGiB {
		return nil, errdefs.Invalid("min_disk_gib %d is smaller than the image's virtual size (%d bytes, %d GiB)", minDisk, info.VirtualSize, needGiB)
	}
	return &minicloudv1.Image{
		Meta: &minicloudv1.ObjectMeta{
			Id:         uuid.NewString(),
			Name:       h.GetName(),
			CreateTime: timestamppb.Now(),
		},
		Format:             format,
		VirtualSizeBytes:   info.VirtualSize,
		Cmdline:            h.GetCmdline(),
		MinDiskGib:         minDisk,
		RequiredHypervisor: h.GetRequiredHypervisor(),
		DefaultUser:        h.GetDefaultUser(),
	}, nil
}

// commit renames the parts to their digests and writes the image key with a
// create-only transaction. If the key cannot be written, blobs no image
// references are removed again.
func (u *upload) commit(ctx context.Context, img *minicloudv1.Image, stream minicloudv1.ImageService_CreateImageServer) (err error) {
	s := u.s
	lock, err := s.lockStore(ctx)
	if err != nil {
		return err
	}
	defer lock.unlock()
	defer func() {
		if err == nil || len(u.created) == 0 {
			return
		}
		// Use a fresh context: the caller's may be what failed.
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), cleanupTimeout)
		defer cancel()
		if cerr := s.removeUnreferenced(cctx, lock, u.created); cerr != nil {
			s.log.Warn("remove blobs of failed upload", "image", img.GetMeta().GetName(), "err", cerr)
		}
	}()

	// The blobs this upload added: checked in the background once the
	// image is recorded (checks.go; the watch of the image records queues
	// them too, on every replica).
	var committed []string
	for part, w := range u.parts {
		sha, size, created, err := w.commit()
		u.release(w)
		if err != nil {
			return errdefs.Wrap(errdefs.KindUnavailable, err, "store image %s", img.GetMeta().GetName())
		}
		if created {
			u.created = append(u.created, sha)
			committed = append(committed, sha)
		}
		blob := &minicloudv1.ImageBlob{Sha256: sha, SizeBytes: size}
		switch part {
		case minicloudv1.ImagePart_IMAGE_PART_DISK:
			img.Disk = blob
		case minicloudv1.ImagePart_IMAGE_PART_KERNEL:
			img.Kernel = blob
		case minicloudv1.ImagePart_IMAGE_PART_INITRD:
			img.Initrd = blob
		}
	}
	val, err := proto.Marshal(img)
	if err != nil {
		return fmt.Errorf("encode image: %w", err)
	}
	key := store.ImageKey(img.GetMeta().GetName())
	for range commitAttempts {
		// The image's bytes are charged to its project in the transaction
		// that records it: of two uploads that each fit alone but not
		// together, the second to commit fails its compare, re-reads the
		// usage and is refused.
		usage, err := store.ReadCountedUsage(ctx, s.etcd, img.GetMeta().GetProject())
		if err != nil {
			return err
		}
		next, err := store.Charge(usage.Project, usage.Usage, &minicloudv1.QuotaUsage{ImageBytes: store.ImageBytes(img)}, store.EffectiveLimits(s.quotaDefaults, usage.Overrides))
		if err != nil {
			return err
		}
		quotaCmps, quotaOps, err := store.ChargeOps(usage, next)
		if err != nil {
			return err
		}
		resp, err := s.etcd.Txn(ctx).
			If(append([]clientv3.Cmp{clientv3.Compare(clientv3.CreateRevision(key), "=", 0), lock.owned()}, quotaCmps...)...).
			Then(append([]clientv3.Op{clientv3.OpPut(key, string(val))}, quotaOps...)...).
			Else(clientv3.OpGet(key, clientv3.WithCountOnly())).
			Commit()
		if err != nil {
			return storeErr(err, "store image %s", img.GetMeta().GetName())
		}
		if resp.Succeeded {
			img.Meta.ResourceVersion = resp.Header.Revision
			for _, d := range committed {
				s.queueCheck(d)
			}
			return stream.SendAndClose(img)
		}
		if err := lock.held(); err != nil {
			return err
		}
		if resp.Responses[0].GetResponseRange().GetCount() > 0 {
			return errdefs.AlreadyExists("image %q already exists", img.GetMeta().GetName())
		}
		// The project's usage or limits changed: decide again.
	}
	return errdefs.Conflict("image %q: the project's quota kept changing while the image was recorded; retry", img.GetMeta().GetName())
}

// commitAttempts bounds how often an upload's commit re-reads a quota
// that changed under it.
const commitAttempts = 8

// uploadQuota is the room an owner project had for image bytes when its
// upload began.
type uploadQuota struct {
	project string
	used    *minicloudv1.QuotaUsage
	limits  *minicloudv1.QuotaLimits
}

func (s *Service) readQuota(ctx context.Context, project string) (uploadQuota, error) {
	u, err := store.ReadCountedUsage(ctx, s.etcd, project)
	if err != nil {
		return uploadQuota{}, err
	}
	return uploadQuota{project: project, used: u.Usage, limits: store.EffectiveLimits(s.quotaDefaults, u.Overrides)}, nil
}

// check refuses an upload of n bytes that the project has no room for.
func (q uploadQuota) check(n int64) error {
	if limit := q.limits.GetImageBytes(); limit == store.Unlimited || q.used.GetImageBytes()+n <= limit {
		return nil
	}
	_, err := store.Charge(q.project, q.used, &minicloudv1.QuotaUsage{ImageBytes: n}, q.limits)
	return err
}

// abort drops every temporary file that was not committed.
func (u *upload) abort() {
	for _, w := range u.parts {
		w.abort()
		u.release(w)
	}
}

// release drops the upload key of w's temporary file, which must be gone
// (committed or removed) by now.
func (u *upload) release(w *blobWriter) {
	if w.released {
		return
	}
	w.released = true
	u.s.unregisterUpload(w.tempName())
}

// checkFree refuses to write n more bytes when that would leave less than
// the free-space floor on the image store's file system.
func (s *Service) checkFree(n int64) error {
	var st unix.Statfs_t
	if err := unix.Statfs(s.blobs.dir, &st); err != nil {
		return errdefs.Wrap(errdefs.KindUnavailable, err, "image store free space")
	}
	free := int64(st.Bavail) * int64(st.Bsize)
	if free-n < s.minFree {
		return errdefs.ResourceExhausted("the image store has %d bytes free; writing %d more would leave less than the floor of %d: free space or raise it (--image-store-min-free)", free, n, s.minFree)
	}
	return nil
}

// formatName is "raw" or "qcow2" (or the enum's name) for messages.
func formatName(f minicloudv1.ImageFormat) string {
	return strings.ToLower(strings.TrimPrefix(f.String(), "IMAGE_FORMAT_"))
}
