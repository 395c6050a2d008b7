package activities

import (
	"sync"
	"testing"

	"github.com/stretchr/testify/require"
)

// Counts per engine under concurrent use; changes coalesce into one pending
// signal, so a slow reader never blocks a generation.
func TestGenerations(t *testing.T) {
	var g Generations
	var wg sync.WaitGroup
	ends := make(chan func(), 100)
	for i := range 100 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			url := "http://a"
			if i%4 == 0 {
				url = "http://b" // a reload's other engine
			}
			ends <- g.begin("p", url)
		}()
	}
	wg.Wait()
	require.Equal(t, 75, g.Running("p", "http://a"))
	require.Equal(t, 25, g.Running("p", "http://b"))
	require.Zero(t, g.Running("q", "http://a"))
	<-g.Changed()
	select {
	case <-g.Changed():
		t.Fatal("100 changes left more than one pending signal")
	default:
	}
	close(ends)
	for end := range ends {
		end()
	}
	require.Zero(t, g.Running("p", "http://a"))
	require.Empty(t, g.running, "idle engines leave no entries")
	<-g.Changed()

	var none *Generations
	none.begin("p", "u")()
	require.Zero(t, none.Running("p", "u"))
}
