package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
)

// defaultConsoleTail bounds a console-log answer unless asked otherwise.
const (
	defaultConsoleTail = 64 << 10
	maxConsoleTail     = 1 << 20
)

// AgentService serves what only this host has to the API server.
type AgentService struct {
	minicloudv1.UnimplementedAgentServiceServer
	agent *Agent
}

// Service returns the gRPC service the agent exposes on its address.
func (a *Agent) Service() *AgentService { return &AgentService{agent: a} }

// GetConsoleLog returns the tail of a VM's serial console log.
func (s *AgentService) GetConsoleLog(_ context.Context, req *minicloudv1.AgentConsoleLogRequest) (*minicloudv1.GetConsoleLogResponse, error) {
	id := req.GetVmId()
	if err := s.knownVM(id); err != nil {
		return nil, err
	}
	n := req.GetTailBytes()
	if n <= 0 {
		n = defaultConsoleTail
	}
	n = min(n, maxConsoleTail)
	data, truncated, err := readTail(s.agent.consoleLogPath(id), n)
	if errors.Is(err, os.ErrNotExist) {
		return &minicloudv1.GetConsoleLogResponse{}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read console log of VM %s: %w", id, err)
	}
	return &minicloudv1.GetConsoleLogResponse{Data: data, Truncated: truncated}, nil
}

// readTail returns the last n bytes of a file.
func readTail(path string, n int64) ([]byte, bool, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, false, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, false, err
	}
	off := max(fi.Size()-n, 0)
	if _, err := f.Seek(off, io.SeekStart); err != nil {
		return nil, false, err
	}
	data, err := io.ReadAll(io.LimitReader(f, n))
	return data, off > 0, err
}
