package apiserver

import (
	"context"

	"github.com/gofiber/fiber/v2"

	"github.com/llorch/llorch/task"
	"github.com/llorch/llorch/tokenstream"
)

// chatLogprobs is chat's choice.logprobs of tokens.
func chatLogprobs(lps []*task.Logprob) fiber.Map {
	content := make([]fiber.Map, 0, len(lps))
	for _, lp := range lps {
		if lp == nil {
			continue
		}
		top := make([]fiber.Map, len(lp.Top))
		for i, t := range lp.Top {
			top[i] = fiber.Map{"token": t.T, "logprob": t.P, "bytes": t.B}
		}
		content = append(content, fiber.Map{"token": lp.T, "logprob": lp.P, "bytes": lp.B, "top_logprobs": top})
	}
	return fiber.Map{"content": content, "refusal": nil}
}

// completionLogprobs is the legacy completions' choice.logprobs of
// tokens whose text starts at offset of the completion.
func completionLogprobs(lps []*task.Logprob, offset int) fiber.Map {
	tokens, logprobs, tops, offsets := []string{}, []float32{}, []map[string]float32{}, []int{}
	for _, lp := range lps {
		if lp == nil {
			continue
		}
		top := make(map[string]float32, len(lp.Top))
		for _, t := range lp.Top {
			if _, seen := top[t.T]; !seen { // two tokens of one text: the likelier
				top[t.T] = t.P
			}
		}
		tokens, logprobs, tops, offsets = append(tokens, lp.T), append(logprobs, lp.P), append(tops, top), append(offsets, offset)
		offset += len(lp.T)
	}
	return fiber.Map{"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}
}

// streamLogprobs reads a task's stream to its end for its tokens' log
// probabilities, by token index (a non-streamed answer that asked for
// them: the workflow's result holds the text, not these).
func (s *Server) streamLogprobs(ctx context.Context, id string) []*task.Logprob {
	st, release := s.readStream(id)
	defer release()
	var lps []*task.Logprob
	cur := tokenstream.Cursor{}
	for {
		evs, next, changed := st.Read(cur)
		cur = next
		for _, ev := range evs {
			if ev.Type != "token" || ev.I < 0 || ev.I >= 1<<24 {
				continue
			}
			for len(lps) <= ev.I {
				lps = append(lps, nil)
			}
			lps[ev.I] = ev.LP
		}
		if cur.Done {
			return lps
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return lps
		case <-s.closing:
			return lps
		}
	}
}
