package main

import (
	"context"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/spf13/cobra"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/client"
)

func (a *app) newProjectCommand() *cobra.Command {
	cmd := groupCommand(&cobra.Command{Use: "project", Short: "Manage projects (admin): the tenants VMs, networks and images belong to"})
	complete := a.completeNames(func(ctx context.Context, c *client.Client) ([]string, error) {
		resp, err := client.ListAll(ctx, &minicloudv1.ListProjectsRequest{}, c.Auth.ListProjects, 0)
		var names []string
		for _, p := range resp.GetProjects() {
			names = append(names, p.GetName())
		}
		return names, err
	})
	create := &cobra.Command{Use: "create NAME [--description TEXT]", Short: "Create a project", Args: exactArgs("NAME")}
	desc := create.Flags().String("description", "", "what the project is for")
	createOut := addOutputFlag(create)
	create.RunE = func(cmd *cobra.Command, args []string) error {
		c, err := a.connect(cmd.Context())
		if err != nil {
			return err
		}
		p, err := c.Auth.CreateProject(cmd.Context(), &minicloudv1.CreateProjectRequest{Name: args[0], Description: *desc})
		if err != nil {
			return err
		}
		return printMessage(a.out, *createOut, p, func(w io.Writer) error { return projectTable(w, []*minicloudv1.Project{p}) })
	}
	list := listCommand(a, "List projects (yours; an admin sees all)",
		func(ctx context.Context, c *client.Client) (*minicloudv1.ListProjectsResponse, error) {
			return client.ListAll(ctx, &minicloudv1.ListProjectsRequest{}, c.Auth.ListProjects, 0)
		},
		func(w io.Writer, r *minicloudv1.ListProjectsResponse) error { return projectTable(w, r.GetProjects()) })
	show := showCommand(a, "Show a project", complete,
		func(ctx context.Context, c *client.Client, name string) (*minicloudv1.Project, error) {
			return c.Auth.GetProject(ctx, &minicloudv1.GetProjectRequest{Name: name})
		},
		func(w io.Writer, p *minicloudv1.Project) error { return projectTable(w, []*minicloudv1.Project{p}) })
	del := nameCommand(a, "delete", "Delete an empty project no user has a role in", "project", "deleted", complete,
		func(ctx context.Context, c *client.Client, name string) error {
			return ignoreResult(c.Auth.DeleteProject(ctx, &minicloudv1.DeleteProjectRequest{Name: name}))
		})
	cmd.AddCommand(create, list, show, del)
	return cmd
}

func projectTable(w io.Writer, ps []*minicloudv1.Project) error {
	rows := make([][]string, 0, len(ps))
	for _, p := range ps {
		rows = append(rows, []string{p.GetName(), orDash(p.GetDescription()), age(p.GetCreateTime())})
	}
	return writeTable(w, []string{"NAME", "DESCRIPTION", "AGE"}, rows)
}

func (a *app) newUserCommand() *cobra.Command {
	cmd := groupCommand(&cobra.Command{Use: "user", Short: "Manage users and their roles (admin)"})
	complete := a.completeNames(func(ctx context.Context, c *client.Client) ([]string, error) {
		resp, err := client.ListAll(ctx, &minicloudv1.ListUsersRequest{}, c.Auth.ListUsers, 0)
		var names []string
		for _, u := range resp.GetUsers() {
			names = append(names, u.GetName())
		}
		return names, err
	})

	create := &cobra.Command{Use: "create NAME --role reader|member|admin [--project P]", Short: "Create a user and print its first token (shown once)", Args: exactArgs("NAME")}
	role := create.Flags().String("role", "", "role: reader, member (in --project) or admin (global)")
	ttl := create.Flags().Duration("token-ttl", 0, "lifetime of the first token (default 30 days)")
	createOut := addOutputFlag(create)
	create.RunE = func(cmd *cobra.Command, args []string) error {
		if err := requireFlags(cmd, "role"); err != nil {
			return err
		}
		c, err := a.connect(cmd.Context())
		if err != nil {
			return err
		}
		project := ""
		if *role != "admin" {
			project = a.project()
		}
		resp, err := c.Auth.CreateUser(cmd.Context(), &minicloudv1.CreateUserRequest{
			Name: args[0], Project: project, Role: *role, TokenTtlSeconds: int64(ttl.Seconds())})
		if err != nil {
			return err
		}
		return printMessage(a.out, *createOut, resp, func(w io.Writer) error {
			fmt.Fprintf(w, "user %s created (%s)\ntoken (shown once; keep it secret): %s\n", resp.GetUser().GetName(), rolesText(resp.GetUser().GetRoles()), resp.GetToken())
			return nil
		})
	}

	list := listCommand(a, "List users",
		func(ctx context.Context, c *client.Client) (*minicloudv1.ListUsersResponse, error) {
			return client.ListAll(ctx, &minicloudv1.ListUsersRequest{}, c.Auth.ListUsers, 0)
		},
		func(w io.Writer, r *minicloudv1.ListUsersResponse) error { return userTable(w, r.GetUsers()) })
	show := showCommand(a, "Show a user", complete,
		func(ctx context.Context, c *client.Client, name string) (*minicloudv1.User, error) {
			return c.Auth.GetUser(ctx, &minicloudv1.GetUserRequest{Name: name})
		},
		func(w io.Writer, u *minicloudv1.User) error { return userTable(w, []*minicloudv1.User{u}) })
	del := nameCommand(a, "delete", "Delete a user and revoke all its tokens", "user", "deleted", complete,
		func(ctx context.Context, c *client.Client, name string) error {
			return ignoreResult(c.Auth.DeleteUser(ctx, &minicloudv1.DeleteUserRequest{Name: name}))
		})

	grant := &cobra.Command{Use: "grant NAME --role reader|member|admin [--project P]", Short: "Give a user a role in a project (or admin)", Args: exactArgs("NAME")}
	grantRole := grant.Flags().String("role", "", "role: reader, member (in --project) or admin (global)")
	grant.RunE = func(cmd *cobra.Command, args []string) error {
		if err := requireFlags(cmd, "role"); err != nil {
			return err
		}
		c, err := a.connect(cmd.Context())
		if err != nil {
			return err
		}
		project := ""
		if *grantRole != "admin" {
			project = a.project()
		}
		u, err := c.Auth.GrantRole(cmd.Context(), &minicloudv1.GrantRoleRequest{User: args[0], Project: project, Role: *grantRole})
		if err != nil {
			return err
		}
		fmt.Fprintf(a.out, "user %s: %s\n", u.GetName(), rolesText(u.GetRoles()))
		return nil
	}
	revoke := &cobra.Command{Use: "revoke-role NAME [--project P | --admin]", Short: "Take a user's role in a project (or admin) away", Args: exactArgs("NAME")}
	revokeAdmin := revoke.Flags().Bool("admin", false, "take the admin role away")
	revoke.RunE = func(cmd *cobra.Command, args []string) error {
		c, err := a.connect(cmd.Context())
		if err != nil {
			return err
		}
		project := ""
		if !*revokeAdmin {
			if project = a.project(); project == "" {
				return usagef("name the project with --project, or give --admin")
			}
		}
		u, err := c.Auth.RevokeRole(cmd.Context(), &minicloudv1.RevokeRoleRequest{User: args[0], Project: project})
		if err != nil {
			return err
		}
		fmt.Fprintf(a.out, "user %s: %s\n", u.GetName(), rolesText(u.GetRoles()))
		return nil
	}
	cmd.AddCommand(create, list, show, del, grant, revoke)
	return cmd
}

func rolesText(bs []*minicloudv1.RoleBinding) string {
	var parts []string
	for _, b := range bs {
		if b.GetProject() == "" {
			parts = append(parts, b.GetRole())
		} else {
			parts = append(parts, b.GetRole()+" in "+b.GetProject())
		}
	}
	if len(parts) == 0 {
		return "no roles"
	}
	return strings.Join(parts, ", ")
}

func userTable(w io.Writer, us []*minicloudv1.User) error {
	rows := make([][]string, 0, len(us))
	for _, u := range us {
		rows = append(rows, []string{u.GetName(), rolesText(u.GetRoles()), age(u.GetCreateTime())})
	}
	return writeTable(w, []string{"NAME", "ROLES", "AGE"}, rows)
}

func (a *app) newTokenCommand() *cobra.Command {
	cmd := groupCommand(&cobra.Command{Use: "token", Short: "Manage bearer tokens (yours; an admin: anyone's)"})
	create := &cobra.Command{Use: "create [--user U] [--ttl 720h] [--description TEXT]", Short: "Create a token (the secret is shown once)", Args: noArgs}
	user := create.Flags().String("user", "", "user the token is for (default you; another user needs admin)")
	ttl := create.Flags().Duration("ttl", 0, "lifetime (default 30 days, at most 365 days)")
	desc := create.Flags().String("description", "", "what the token is for")
	createOut := addOutputFlag(create)
	create.RunE = func(cmd *cobra.Command, _ []string) error {
		c, err := a.connect(cmd.Context())
		if err != nil {
			return err
		}
		resp, err := c.Auth.CreateToken(cmd.Context(), &minicloudv1.CreateTokenRequest{User: *user, TtlSeconds: int64(ttl.Seconds()), Description: *desc})
		if err != nil {
			return err
		}
		return printMessage(a.out, *createOut, resp, func(w io.Writer) error {
			_, err := fmt.Fprintln(w, resp.GetToken())
			return err
		})
	}
	list := &cobra.Command{Use: "list [--user U | --all-users]", Short: "List tokens (never their secrets)", Args: noArgs}
	listUser := list.Flags().String("user", "", "whose tokens (default yours; another user needs admin)")
	all := list.Flags().Bool("all-users", false, "every user's tokens (admin)")
	listOut := addOutputFlag(list)
	list.RunE = func(cmd *cobra.Command, _ []string) error {
		c, err := a.connect(cmd.Context())
		if err != nil {
			return err
		}
		resp, err := client.ListAll(cmd.Context(), &minicloudv1.ListTokensRequest{User: *listUser, AllUsers: *all}, c.Auth.ListTokens, 0)
		if err != nil {
			return err
		}
		return printMessage(a.out, *listOut, resp, func(w io.Writer) error {
			rows := make([][]string, 0, len(resp.GetTokens()))
			for _, t := range resp.GetTokens() {
				rows = append(rows, []string{t.GetId(), t.GetUser(), orDash(t.GetDescription()), timestamp(t.GetExpireTime()), age(t.GetCreateTime())})
			}
			return writeTable(w, []string{"ID", "USER", "DESCRIPTION", "EXPIRES", "AGE"}, rows)
		})
	}
	revoke := &cobra.Command{Use: "revoke ID", Short: "Revoke a token (by the id `token list` shows, or the token itself)", Args: exactArgs("ID")}
	revoke.RunE = func(cmd *cobra.Command, args []string) error {
		c, err := a.connect(cmd.Context())
		if err != nil {
			return err
		}
		if _, err := c.Auth.RevokeToken(cmd.Context(), &minicloudv1.RevokeTokenRequest{Id: args[0]}); err != nil {
			return err
		}
		fmt.Fprintf(a.out, "token %s revoked\n", tokenIDOf(args[0]))
		return nil
	}
	cmd.AddCommand(create, list, revoke)
	return cmd
}

// tokenIDOf shows a token's public part, never its secret.
func tokenIDOf(s string) string {
	s = strings.TrimPrefix(s, "mct_")
	if parts := strings.Split(s, "."); len(parts) >= 2 {
		return parts[0] + "." + parts[1]
	}
	return s
}

func (a *app) newWhoAmICommand() *cobra.Command {
	cmd := &cobra.Command{Use: "whoami", Short: "Show who your credentials say you are, and your roles", Args: noArgs}
	out := addOutputFlag(cmd)
	cmd.RunE = func(cmd *cobra.Command, _ []string) error {
		c, err := a.connect(cmd.Context())
		if err != nil {
			return err
		}
		w, err := c.Auth.WhoAmI(cmd.Context(), &minicloudv1.WhoAmIRequest{})
		if err != nil {
			return err
		}
		return printMessage(a.out, *out, w, func(wr io.Writer) error {
			fields := []field{
				{"Name", w.GetName()},
				{"Kind", w.GetKind()},
				{"Roles", rolesText(w.GetRoles())},
				{"Default project", orDash(w.GetDefaultProject())},
				{"Token", orDash(w.GetTokenId())},
			}
			if t := w.GetTokenExpireTime(); t != nil {
				fields = append(fields, field{"Token expires", t.AsTime().Local().Format(time.RFC3339)})
			}
			return writeFields(wr, fields)
		})
	}
	return cmd
}
