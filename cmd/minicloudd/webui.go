package main

import (
	"fmt"
	"log/slog"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/minicloud/minicloud/api/httpapi"
	apiserver "github.com/minicloud/minicloud/api/server"
	"github.com/minicloud/minicloud/api/webui"
	"github.com/minicloud/minicloud/pkg/client"
	"github.com/minicloud/minicloud/pkg/pki"
)

// newWebUI is the web console, talking to the API listening at apiAddr
// as every other client does: over TLS trusting the cluster CA, with no
// credentials of its own (each call carries the signed-in user's token).
// It has a connection of its own, made by pkg/client, because it reads
// error kinds (errdefs) from its calls; the gateway's connection must
// keep the raw gRPC statuses it maps to HTTP.
func newWebUI(apiAddr string, cfg apiserver.Config) (*webui.Handler, *client.Client, error) {
	addr, err := httpapi.LoopbackAddr(apiAddr)
	if err != nil {
		return nil, nil, err
	}
	creds := credentials.NewTLS(pki.ClientTLS(cfg.CA.Pool(), nil, pki.OrgControlPlane))
	conn, err := client.NewConn(addr, grpc.WithTransportCredentials(creds))
	if err != nil {
		return nil, nil, fmt.Errorf("web console: dial API at %s: %w", addr, err)
	}
	api := client.New(conn)
	ui, err := webui.New(webui.Config{API: api, Logger: slog.Default().With("component", "webui")})
	if err != nil {
		api.Close()
		return nil, nil, err
	}
	return ui, api, nil
}
