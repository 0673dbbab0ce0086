package client

import (
	"fmt"
	"os"
	"strings"

	"google.golang.org/grpc"
	"sigs.k8s.io/yaml"
)

// Config is the client configuration file (~/.config/minicloud/config.yaml
// for the CLI; the API writes one with the admin's token to
// DATA_DIR/admin.yaml).
type Config struct {
	Endpoint string `json:"endpoint,omitempty"`
	// Endpoints lists the API replicas of one cluster (instead of Endpoint).
	Endpoints []string `json:"endpoints,omitempty"`
	Project   string   `json:"project,omitempty"`
	// CA is the path of the cluster CA certificate (PEM) to trust.
	CA string `json:"ca,omitempty"`
	// Token is the bearer token sent with every call.
	Token string `json:"token,omitempty"`
}

// LoadConfig reads a config file; unknown keys are an error.
func LoadConfig(path string) (Config, error) {
	var c Config
	b, err := os.ReadFile(path)
	if err != nil {
		return c, fmt.Errorf("read config: %w", err)
	}
	if err := yaml.UnmarshalStrict(b, &c); err != nil {
		return c, fmt.Errorf("config file %s: %w", path, err)
	}
	if c.Endpoint != "" && len(c.Endpoints) > 0 {
		return c, fmt.Errorf("config file %s: give either endpoint or endpoints, not both", path)
	}
	for _, e := range c.Endpoints {
		if e == "" || strings.Contains(e, ",") {
			return c, fmt.Errorf("config file %s: endpoints: %q must be one host:port per list item", path, e)
		}
	}
	return c, nil
}

// Write writes c to path, readable only by its owner (it holds a token).
func (c Config) Write(path string) error {
	out, err := yaml.Marshal(c)
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, out, 0o600); err != nil {
		return fmt.Errorf("write %s: %w", tmp, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("install %s: %w", path, err)
	}
	return nil
}

// EndpointList is the endpoints, comma-separated as Dial takes them.
func (c Config) EndpointList() string {
	if len(c.Endpoints) > 0 {
		return strings.Join(c.Endpoints, ",")
	}
	return c.Endpoint
}

// DialOptions trust c's CA and send c's token.
func (c Config) DialOptions() ([]grpc.DialOption, error) {
	return UserDialOptions(c.CA, c.Token)
}
