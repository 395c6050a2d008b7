package link

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"

	"github.com/llorch/llorch/apiclient"
	"github.com/llorch/llorch/node"
	"github.com/llorch/llorch/task"
)

// The fast start over the link (docs/tasks.md, "The fast start"): the
// replica that admits a task POSTs its request to the node of the granted
// slot while the task's workflow starts; the node runs the generation at
// once and the workflow's Generate activity takes it over.

// Generator runs generations ahead of their workflows on the node
// (activities.GenerateActivities).
type Generator interface {
	// StartEarly starts req's generation on the slot req.FastStart names;
	// node.ErrGenerationExists (errors.Is) when the node runs or ran one of
	// the task, node.ErrNotThisNode when the slot is not this node's.
	StartEarly(req task.Request) error
	// CancelEarly cancels the task's generation started ahead that no
	// activity took over; it reports whether there was one.
	CancelEarly(taskID, reason string) bool
}

const codeTooLarge = "PAYLOAD_TOO_LARGE"

// generate serves POST node.LinkTaskGeneratePath: 202 once the generation
// is under way, 409 when the node has one of the task.
func (s *Server) generate(w http.ResponseWriter, r *http.Request, id string) {
	if s.gen == nil {
		writeError(w, http.StatusNotFound, apiclient.Envelope{Code: codeNotFound,
			Message: "node " + s.nodeID() + " starts no generation ahead of its workflow (an older worker)"})
		return
	}
	raw, err := io.ReadAll(io.LimitReader(r.Body, node.LinkMaxGenerateBody+1))
	if err != nil {
		writeError(w, http.StatusBadRequest, apiclient.Envelope{Code: codeInvalidParams, Field: "body", Message: "body: " + err.Error()})
		return
	}
	if len(raw) > node.LinkMaxGenerateBody {
		writeError(w, http.StatusRequestEntityTooLarge, apiclient.Envelope{Code: codeTooLarge, Field: "body",
			Message: fmt.Sprintf("body: at most %d bytes", node.LinkMaxGenerateBody)})
		return
	}
	// Fields a newer replica adds are not refused: the generation runs as
	// its workflow's would, and the workflow's own input is what counts.
	var req task.Request
	if err := json.Unmarshal(raw, &req); err != nil {
		writeError(w, http.StatusBadRequest, apiclient.Envelope{Code: codeInvalidParams, Field: "body", Message: "body: not a task request: " + err.Error()})
		return
	}
	if req.TaskID != id {
		writeError(w, http.StatusBadRequest, apiclient.Envelope{Code: codeInvalidParams, Field: "task_id",
			Message: fmt.Sprintf("task_id: the body's %q is not the path's %q", req.TaskID, id)})
		return
	}
	switch err := s.gen.StartEarly(req); {
	case errors.Is(err, node.ErrGenerationExists):
		writeError(w, http.StatusConflict, apiclient.Envelope{Code: node.CodeGenerationExists,
			Message: fmt.Sprintf("node %s runs or ran a generation of task %s: %v", s.nodeID(), id, err)})
	case errors.Is(err, node.ErrNotThisNode):
		writeError(w, http.StatusBadRequest, apiclient.Envelope{Code: codeInvalidParams, Field: "fast_start", Message: "fast_start: " + err.Error()})
	case err != nil:
		writeError(w, http.StatusInternalServerError, apiclient.Envelope{Code: "INTERNAL", Message: err.Error()})
	default:
		writeJSON(w, http.StatusAccepted, map[string]string{"task_id": id})
	}
}

// Generate starts req's generation on the node ahead of its workflow
// (req.FastStart names the slot). A node that has one of the task answers
// an *apiclient.Error with code node.CodeGenerationExists.
func (c *Client) Generate(ctx context.Context, req task.Request) error {
	u := strings.TrimRight(c.URL, "/") + node.LinkTaskGeneratePath(req.TaskID)
	body, err := json.Marshal(req)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, answerMargin)
	defer cancel()
	hr, err := http.NewRequestWithContext(ctx, http.MethodPost, u, bytes.NewReader(body))
	if err != nil {
		return fmt.Errorf("node link %s: %w", c.URL, err)
	}
	hr.Header.Set("Content-Type", "application/json")
	c.auth(hr)
	res, err := c.http().Do(hr)
	if err != nil {
		return fmt.Errorf("node link %s: start task %s: %w%s", c.URL, req.TaskID, err, untrusted(err))
	}
	defer res.Body.Close()
	raw, _ := io.ReadAll(io.LimitReader(res.Body, 64<<10))
	if res.StatusCode != http.StatusAccepted {
		return apiclient.ErrorOf(http.MethodPost, u, res.StatusCode, raw)
	}
	return nil
}

// Starter sends generations to the nodes of their granted slots ahead of
// their workflows (scheduler.FastStarter), reaching each node's link where
// the cluster view says it serves: no Temporal read on the way.
type Starter struct {
	// URL is where a node's link serves (scheduler.LinkView.LinkURL).
	URL   func(nodeID string) (string, bool)
	Token string
	HTTP  *http.Client
}

// ErrNoLink: the cluster view knows no link of the node.
var ErrNoLink = errors.New("no node link known")

func (s *Starter) client(nodeID string) (*Client, error) {
	u, ok := s.URL(nodeID)
	if !ok {
		return nil, fmt.Errorf("node %s: %w", nodeID, ErrNoLink)
	}
	return &Client{URL: u, Token: s.Token, HTTP: s.HTTP}, nil
}

// Start sends req to the node its FastStart names.
func (s *Starter) Start(ctx context.Context, req task.Request) error {
	if req.FastStart == nil {
		return errors.New("link: a fast start needs the request's FastStart slot")
	}
	c, err := s.client(req.FastStart.NodeID)
	if err != nil {
		return err
	}
	return c.Generate(ctx, req)
}

// Cancel stops the task's generation started ahead on the node, and ends
// its node stream with CANCELED.
func (s *Starter) Cancel(ctx context.Context, where task.Where, taskID, reason string) error {
	c, err := s.client(where.NodeID)
	if err != nil {
		return err
	}
	return c.Cancel(ctx, taskID, reason)
}
