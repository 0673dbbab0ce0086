package server

import (
	"context"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/minicloud/minicloud/api/auth"
	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/errdefs"
	"github.com/minicloud/minicloud/pkg/store"
)

// BootstrapAdminUser is the user the first API server makes, as kubeadm
// writes admin.conf: whoever can read the API's data directory (root)
// holds its token.
const BootstrapAdminUser = "admin"

// BootstrapAdmin makes sure the cluster has the "default" project and the
// admin user, and returns a fresh admin token valid for ttl. Safe to call
// from every replica at every start: it creates only what is missing.
func BootstrapAdmin(ctx context.Context, cli store.Leaser, ttl time.Duration) (string, error) {
	err := store.CreateProject(ctx, cli, &minicloudv1.Project{Name: defaultProject, Description: "made at bootstrap", CreateTime: timestamppb.Now()})
	if err != nil && !errdefs.IsAlreadyExists(err) {
		return "", err
	}
	parts, tok, err := newToken(BootstrapAdminUser, ttl, "bootstrap admin token")
	if err != nil {
		return "", err
	}
	u := &minicloudv1.User{Name: BootstrapAdminUser, CreateTime: timestamppb.Now(),
		Roles: []*minicloudv1.RoleBinding{{Role: string(auth.RoleAdmin)}}}
	err = store.CreateUser(ctx, cli, u, tok)
	if errdefs.IsAlreadyExists(err) {
		err = store.CreateToken(ctx, cli, tok, MaxTokensPerUser)
	}
	if err != nil {
		return "", err
	}
	return parts.String(), nil
}

// TokenValidFor says whether token is valid and stays so for at least d.
func TokenValidFor(ctx context.Context, kv store.Leaser, token string, d time.Duration) (bool, error) {
	parts, ok := auth.ParseToken(token)
	if !ok {
		return false, nil
	}
	creds, err := store.ReadCredentials(ctx, kv, parts.User, parts.ID)
	if err != nil {
		return false, err
	}
	return creds.Token != nil && creds.User != nil && auth.SecretMatches(parts.Secret, creds.Token.GetSecretSha256()) &&
		time.Now().Add(d).Before(creds.Token.GetExpireTime().AsTime()), nil
}
