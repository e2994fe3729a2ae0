// catalog: a product search service in Go. GET /search?q=... scores every product of the catalogue
// against the query's words and returns the ten best: rankProducts -> score is its hot path.
//
//	catalog PORT
package main

import (
	"fmt"
	"net/http"
	"os"
	"sort"
	"strings"
)

type product struct {
	name  string
	words []string
}

var catalogue []product

//go:noinline
func score(p *product, terms []string) int {
	n := 0
	for _, term := range terms {
		for _, word := range p.words {
			if strings.Contains(word, term) {
				n++
			}
		}
	}
	return n
}

//go:noinline
func rankProducts(query string) []string {
	terms := strings.Fields(strings.ToLower(query))
	type hit struct {
		name  string
		score int
	}
	hits := make([]hit, 0, len(catalogue))
	for i := range catalogue {
		hits = append(hits, hit{catalogue[i].name, score(&catalogue[i], terms)})
	}
	sort.SliceStable(hits, func(a, b int) bool { return hits[a].score > hits[b].score })
	top := make([]string, 0, 10)
	for _, h := range hits[:10] {
		top = append(top, h.name)
	}
	return top
}

func search(w http.ResponseWriter, r *http.Request) {
	fmt.Fprintln(w, strings.Join(rankProducts(r.URL.Query().Get("q")), ","))
}

func main() {
	adjectives := []string{"red", "blue", "steel", "oak", "small", "large", "quiet", "fast", "smart", "classic"}
	nouns := []string{"chair", "table", "lamp", "kettle", "drill", "phone", "desk", "shelf", "bike", "clock"}
	for i := 0; i < 4000; i++ {
		words := []string{adjectives[i%10], adjectives[(i/10)%10], nouns[(i/100)%10], fmt.Sprintf("model%d", i)}
		catalogue = append(catalogue, product{strings.Join(words, " "), words})
	}
	http.HandleFunc("/search", search)
	if err := http.ListenAndServe("127.0.0.1:"+os.Args[1], nil); err != nil {
		fmt.Fprintln(os.Stderr, "catalog:", err)
		os.Exit(1)
	}
}
