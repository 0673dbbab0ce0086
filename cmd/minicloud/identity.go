package main

import (
	"bytes"
	"encoding/json"
	"fmt"

	"github.com/spf13/cobra"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
)

func (a *app) newIdentityCommand() *cobra.Command {
	cmd := groupCommand(&cobra.Command{Use: "identity", Short: "Workload identity: the keys that verify guests' identity tokens"})
	jwks := &cobra.Command{
		Use:   "jwks",
		Short: "Print the JSON Web Key Set that verifies guests' identity tokens",
		Long: "Print the JSON Web Key Set (RFC 7517) that verifies the identity tokens guests get from the metadata service.\n" +
			"The same document is served to anyone at ISSUER/.well-known/jwks.json on the API's HTTP listener;\n" +
			"this prints it for verifiers that cannot reach that listener (copy it, and copy it again after a rotation).",
		Args: cobra.NoArgs,
	}
	jwks.RunE = func(cmd *cobra.Command, _ []string) error {
		c, err := a.connect(cmd.Context())
		if err != nil {
			return err
		}
		resp, err := c.Identity.GetJWKS(cmd.Context(), &minicloudv1.GetJWKSRequest{})
		if err != nil {
			return err
		}
		var out bytes.Buffer
		if err := json.Indent(&out, resp.GetJwks(), "", "  "); err != nil {
			return fmt.Errorf("the API returned a JWKS that is not JSON: %w", err)
		}
		out.WriteByte('\n')
		_, err = a.out.Write(out.Bytes())
		return err
	}
	cmd.AddCommand(jwks)
	return cmd
}
