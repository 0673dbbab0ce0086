package server

import (
	"context"

	clientv3 "go.etcd.io/etcd/client/v3"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/store"
)

// quotaService implements minicloudv1.QuotaServiceServer. Enforcement is
// not here: every create charges its project's usage in its own
// transaction (pkg/store/quota.go).
type quotaService struct {
	minicloudv1.UnimplementedQuotaServiceServer
	s *Server
}

func (q *quotaService) GetQuota(ctx context.Context, req *minicloudv1.GetQuotaRequest) (*minicloudv1.Quota, error) {
	project, err := projectOf(req.GetProject())
	if err != nil {
		return nil, err
	}
	u, err := store.ReadCountedUsage(ctx, q.s.etcd, project)
	if err != nil {
		return nil, err
	}
	return q.s.quotaOf(u), nil
}

// SetQuota writes the merged overrides under a compare of the limits key,
// so two concurrent SetQuota calls on different fields both take effect.
func (q *quotaService) SetQuota(ctx context.Context, req *minicloudv1.SetQuotaRequest) (*minicloudv1.Quota, error) {
	project, err := projectOf(req.GetProject())
	if err != nil {
		return nil, err
	}
	if err := store.ValidateLimits(req.GetLimits()); err != nil {
		return nil, err
	}
	for range maxTxnAttempts {
		u, err := store.ReadCountedUsage(ctx, q.s.etcd, project)
		if err != nil {
			return nil, err
		}
		cur := u.Overrides
		if req.GetResetToDefaults() {
			cur = &minicloudv1.QuotaLimits{}
		}
		next := store.MergeOverrides(cur, req.GetLimits())
		op, err := store.PutOp(store.QuotaLimitsKey(project), next)
		if err != nil {
			return nil, err
		}
		_, ok, err := store.Commit(ctx, q.s.etcd, []clientv3.Cmp{store.Unchanged(store.QuotaLimitsKey(project), u.LimitsRev)}, []clientv3.Op{op})
		if err != nil {
			return nil, err
		}
		if ok {
			u.Overrides = next
			q.s.log.Info("quota set", "project", project, "overrides", next.String())
			return q.s.quotaOf(u), nil
		}
	}
	return nil, tooMuchContention("set quota of project " + project)
}

func (s *Server) quotaOf(u store.UsageState) *minicloudv1.Quota {
	return &minicloudv1.Quota{
		Project:   u.Project,
		Limits:    store.EffectiveLimits(s.quotaDefaults, u.Overrides),
		Overrides: u.Overrides,
		Usage:     u.Usage,
	}
}
