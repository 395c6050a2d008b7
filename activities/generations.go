package activities

import "sync"

// Generations counts the generations running on each of a node's engines:
// the node's own count of its busy slots, which its link reports (DESIGN.md
// decision 11). The zero value is ready; a nil one counts nothing.
type Generations struct {
	mu      sync.Mutex
	running map[engineKey]int
	changed chan struct{}
}

// engineKey is one engine: its pool and the URL generations stream from
// (an epoch of a reload's old engine keeps its own count).
type engineKey struct{ pool, url string }

// begin counts one generation on the pool's engine at url until end.
func (g *Generations) begin(poolID, url string) (end func()) {
	if g == nil {
		return func() {}
	}
	k := engineKey{poolID, url}
	g.add(k, 1)
	return func() { g.add(k, -1) }
}

func (g *Generations) add(k engineKey, d int) {
	g.mu.Lock()
	if g.running == nil {
		g.running = map[engineKey]int{}
	}
	if g.running[k] += d; g.running[k] == 0 {
		delete(g.running, k)
	}
	ch := g.changedLocked()
	g.mu.Unlock()
	select {
	case ch <- struct{}{}:
	default: // a change is already pending: the reader sees this one too
	}
}

// Running is the number of generations on the pool's engine at url.
func (g *Generations) Running(poolID, url string) int {
	if g == nil {
		return 0
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.running[engineKey{poolID, url}]
}

// Changed receives after a count changed; changes between two receives
// coalesce into one. It has one reader: the node link's feeder. A nil
// Generations never changes.
func (g *Generations) Changed() <-chan struct{} {
	if g == nil {
		return nil
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.changedLocked()
}

func (g *Generations) changedLocked() chan struct{} {
	if g.changed == nil {
		g.changed = make(chan struct{}, 1)
	}
	return g.changed
}
