package store

import (
	"context"
	"slices"

	clientv3 "go.etcd.io/etcd/client/v3"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
)

// The write protocols of tenancy (docs/security.md): projects, users with
// role bindings, and bearer tokens. A token's key sits under its user's, so
// one read gets a token and the user it belongs to, and deleting a user
// deletes its tokens in the same transaction.

// authTxnAttempts bounds the retries of a read-modify-write that lost a race.
const authTxnAttempts = 8

// Credentials is what authenticating one token reads: the token and its
// user, in one snapshot. Either is nil when absent (never made, revoked,
// expired, or the user deleted).
type Credentials struct {
	Token *minicloudv1.Token
	User  *minicloudv1.User
}

// ReadCredentials reads token id of user and the user in one round trip.
func ReadCredentials(ctx context.Context, kv clientv3.KV, user, id string) (*Credentials, error) {
	var r Reads
	tok, usr := r.Get(TokenKey(user, id)), r.Get(UserKey(user))
	if err := r.Do(ctx, kv); err != nil {
		return nil, err
	}
	c := &Credentials{}
	if kv := tok.First(); kv != nil {
		c.Token = &minicloudv1.Token{}
		if err := Decode(kv, c.Token); err != nil {
			return nil, err
		}
	}
	if kv := usr.First(); kv != nil {
		c.User = &minicloudv1.User{}
		if err := Decode(kv, c.User); err != nil {
			return nil, err
		}
	}
	return c, nil
}

// CreateProject stores p unless a project of that name exists.
func CreateProject(ctx context.Context, kv clientv3.KV, p *minicloudv1.Project) error {
	op, err := PutOp(ProjectKey(p.GetName()), p)
	if err != nil {
		return err
	}
	_, ok, err := Commit(ctx, kv, []clientv3.Cmp{Absent(ProjectKey(p.GetName()))}, []clientv3.Op{op})
	if err != nil {
		return err
	}
	if !ok {
		return errdefs.AlreadyExists("project %s already exists", p.GetName())
	}
	return nil
}

// ProjectHolders are the key prefixes under which a project's objects live:
// a project is deleted only when all of them are empty.
func ProjectHolders(project string) map[string]string {
	return map[string]string{
		"VMs":           VMNamePrefix + project + "/",
		"networks":      NetworkPrefix + project + "/",
		"server groups": ServerGroupPrefix + project + "/",
	}
}

// DeleteProject removes project and its quota records if it holds nothing
// (VMs, networks, server groups, images) and no user has a role in it, in
// one transaction that fails if any of that changed since it was checked.
func DeleteProject(ctx context.Context, kv clientv3.KV, project string) error {
	for range authTxnAttempts {
		var r Reads
		proj := r.Get(ProjectKey(project), clientv3.WithCountOnly())
		users := r.Get(UserPrefix, clientv3.WithPrefix())
		// Images are keyed by name, not project: their owner is in the value.
		images := r.Get(ImagePrefix, clientv3.WithPrefix())
		holders := ProjectHolders(project)
		counts := map[string]Read{}
		for what, prefix := range holders {
			counts[what] = r.Get(prefix, clientv3.WithPrefix(), clientv3.WithCountOnly())
		}
		if err := r.Do(ctx, kv); err != nil {
			return err
		}
		if proj.Count() == 0 {
			return errdefs.NotFound("project %s not found", project)
		}
		for _, what := range []string{"VMs", "networks", "server groups"} {
			if n := counts[what].Count(); n > 0 {
				return errdefs.FailedPrecondition("project %s still has %d %s: delete them first", project, n, what)
			}
		}
		imgs, err := DecodeAll(images.KVs(), func() *minicloudv1.Image { return &minicloudv1.Image{} })
		if err != nil {
			return err
		}
		owned := 0
		for _, img := range imgs {
			if img.Value.GetMeta().GetProject() == project {
				owned++
			}
		}
		if owned > 0 {
			return errdefs.FailedPrecondition("project %s still owns %d images: delete them first", project, owned)
		}
		us, err := DecodeAll(users.KVs(), func() *minicloudv1.User { return &minicloudv1.User{} })
		if err != nil {
			return err
		}
		for _, u := range us {
			if slices.ContainsFunc(u.Value.GetRoles(), func(b *minicloudv1.RoleBinding) bool { return b.GetProject() == project }) {
				return errdefs.FailedPrecondition("user %s has a role in project %s: revoke it first (minicloud user revoke-role %s --project %s)", u.Value.GetName(), project, u.Value.GetName(), project)
			}
		}
		cmps := []clientv3.Cmp{UnchangedSince(UserPrefix, r.Revision()), UnchangedSince(ImagePrefix, r.Revision())}
		for _, prefix := range holders {
			cmps = append(cmps, UnchangedSince(prefix, r.Revision()))
		}
		// The project's quota records go with it (a project made again
		// under the name starts from the defaults and a fresh count).
		ops := []clientv3.Op{clientv3.OpDelete(ProjectKey(project)), clientv3.OpDelete(QuotaUsageKey(project)), clientv3.OpDelete(QuotaLimitsKey(project))}
		_, ok, err := Commit(ctx, kv, append(cmps, Exists(ProjectKey(project))), ops)
		if err != nil || ok {
			return err
		}
	}
	return errdefs.Unavailable("project %s changed during delete %d times; retry", project, authTxnAttempts)
}

// CreateUser stores u and its first token (leased until it expires) in one
// transaction: the user must be new and every project it has a role in
// must exist.
func CreateUser(ctx context.Context, cli Leaser, u *minicloudv1.User, tok *minicloudv1.Token) error {
	cmps := []clientv3.Cmp{Absent(UserKey(u.GetName())), Absent(TokenKey(u.GetName(), tok.GetId()))}
	for _, b := range u.GetRoles() {
		if b.GetProject() != "" {
			cmps = append(cmps, Exists(ProjectKey(b.GetProject())))
		}
	}
	put, err := PutOp(UserKey(u.GetName()), u)
	if err != nil {
		return err
	}
	putTok, err := tokenPutOp(ctx, cli, tok)
	if err != nil {
		return err
	}
	_, ok, err := Commit(ctx, cli, cmps, []clientv3.Op{put, putTok})
	if err != nil || ok {
		return err
	}
	if _, err := Get(ctx, cli, UserKey(u.GetName()), &minicloudv1.User{}); err == nil {
		return errdefs.AlreadyExists("user %s already exists", u.GetName())
	}
	for _, b := range u.GetRoles() {
		if b.GetProject() != "" {
			if _, err := Get(ctx, cli, ProjectKey(b.GetProject()), &minicloudv1.Project{}); errdefs.IsNotFound(err) {
				return errdefs.NotFound("project %s not found: create it first (minicloud project create %s)", b.GetProject(), b.GetProject())
			}
		}
	}
	return errdefs.Unavailable("user %s: create raced with another change; retry", u.GetName())
}

func tokenPutOp(ctx context.Context, cli Leaser, tok *minicloudv1.Token) (clientv3.Op, error) {
	lease, err := leaseUntil(ctx, cli, tok.GetExpireTime().AsTime())
	if err != nil {
		return clientv3.Op{}, err
	}
	return PutOp(TokenKey(tok.GetUser(), tok.GetId()), tok, clientv3.WithLease(lease))
}

// CreateToken stores tok (leased until it expires) if its user exists and
// holds fewer than maxPerUser tokens.
func CreateToken(ctx context.Context, cli Leaser, tok *minicloudv1.Token, maxPerUser int64) error {
	user := tok.GetUser()
	for range authTxnAttempts {
		var r Reads
		u := r.Get(UserKey(user), clientv3.WithCountOnly())
		n := r.Get(UserTokensPrefix(user), clientv3.WithPrefix(), clientv3.WithCountOnly())
		if err := r.Do(ctx, cli); err != nil {
			return err
		}
		if u.Count() == 0 {
			return errdefs.NotFound("user %s not found", user)
		}
		if n.Count() >= maxPerUser {
			return errdefs.ResourceExhausted("user %s already holds %d tokens, the most allowed: revoke some first (minicloud token list / token revoke)", user, n.Count())
		}
		put, err := tokenPutOp(ctx, cli, tok)
		if err != nil {
			return err
		}
		cmps := []clientv3.Cmp{Exists(UserKey(user)), UnchangedSince(UserTokensPrefix(user), r.Revision()), Absent(TokenKey(user, tok.GetId()))}
		_, ok, err := Commit(ctx, cli, cmps, []clientv3.Op{put})
		if err != nil || ok {
			return err
		}
	}
	return errdefs.Unavailable("user %s: token create raced with other changes %d times; retry", user, authTxnAttempts)
}

// ListTokens lists user's tokens, or every user's when user is "".
func ListTokens(ctx context.Context, kv clientv3.KV, user string) ([]*minicloudv1.Token, error) {
	prefix := TokenPrefix
	if user != "" {
		prefix = UserTokensPrefix(user)
	}
	objs, _, err := List(ctx, kv, prefix, func() *minicloudv1.Token { return &minicloudv1.Token{} })
	if err != nil {
		return nil, err
	}
	out := make([]*minicloudv1.Token, len(objs))
	for i, o := range objs {
		out[i] = o.Value
	}
	return out, nil
}

// RevokeToken deletes token id of user; NotFound if there is none.
func RevokeToken(ctx context.Context, kv clientv3.KV, user, id string) error {
	resp, err := kv.Delete(ctx, TokenKey(user, id))
	if err != nil {
		return errdefs.Wrap(errdefs.KindUnavailable, err, "revoke token")
	}
	if resp.Deleted == 0 {
		return errdefs.NotFound("token %s.%s not found (revoked or expired already)", user, id)
	}
	return nil
}

// DeleteUser deletes user and all its tokens in one transaction and
// returns the ids of the tokens deleted.
func DeleteUser(ctx context.Context, kv clientv3.KV, user string) ([]string, error) {
	toks, err := ListTokens(ctx, kv, user)
	if err != nil {
		return nil, err
	}
	resp, err := kv.Txn(ctx).If(Exists(UserKey(user))).Then(
		clientv3.OpDelete(UserKey(user)),
		clientv3.OpDelete(UserTokensPrefix(user), clientv3.WithPrefix())).Commit()
	if err != nil {
		return nil, errdefs.Wrap(errdefs.KindUnavailable, err, "delete user")
	}
	if !resp.Succeeded {
		return nil, errdefs.NotFound("user %s not found", user)
	}
	ids := make([]string, len(toks))
	for i, t := range toks {
		ids[i] = t.GetUser() + "." + t.GetId()
	}
	return ids, nil
}

// UpdateUser applies change to user's current record and stores it if
// nothing changed in between; a binding to a project needs the project.
func UpdateUser(ctx context.Context, kv clientv3.KV, user string, change func(*minicloudv1.User) error) (*minicloudv1.User, error) {
	for range authTxnAttempts {
		u := &minicloudv1.User{}
		rev, err := Get(ctx, kv, UserKey(user), u)
		if errdefs.IsNotFound(err) {
			return nil, errdefs.NotFound("user %s not found", user)
		}
		if err != nil {
			return nil, err
		}
		if err := change(u); err != nil {
			return nil, err
		}
		put, err := PutOp(UserKey(user), u)
		if err != nil {
			return nil, err
		}
		cmps := []clientv3.Cmp{Unchanged(UserKey(user), rev)}
		for _, b := range u.GetRoles() {
			if b.GetProject() != "" {
				cmps = append(cmps, Exists(ProjectKey(b.GetProject())))
			}
		}
		_, ok, err := Commit(ctx, kv, cmps, []clientv3.Op{put})
		if err != nil {
			return nil, err
		}
		if ok {
			return u, nil
		}
		for _, b := range u.GetRoles() {
			if b.GetProject() != "" {
				if _, err := Get(ctx, kv, ProjectKey(b.GetProject()), &minicloudv1.Project{}); errdefs.IsNotFound(err) {
					return nil, errdefs.NotFound("project %s not found", b.GetProject())
				}
			}
		}
	}
	return nil, errdefs.Unavailable("user %s changed during update %d times; retry", user, authTxnAttempts)
}
