package benchdoc

import (
	"fmt"
	"strconv"
	"strings"
)

// Counts parses a flag holding a comma-separated list of positive integers
// (VM counts, client counts, hosts), skipping empty items: "" is none.
func Counts(s string) ([]int, error) {
	var out []int
	for f := range strings.SplitSeq(s, ",") {
		if f = strings.TrimSpace(f); f == "" {
			continue
		}
		n, err := strconv.Atoi(f)
		if err != nil || n <= 0 {
			return nil, fmt.Errorf("%q is not a positive count", f)
		}
		out = append(out, n)
	}
	return out, nil
}
