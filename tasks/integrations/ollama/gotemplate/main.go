// Command gotemplate renders Ollama TEMPLATEs with Go's own text/template, filled the way Ollama's server
// fills them for /api/chat, so tunepipe can check a translated template against what Ollama will feed the model.
//
// It reads one JSON request per line on stdin and writes one JSON answer per line on stdout, so one process
// serves many renders:
//
//	{"template": "...", "system": "Modelfile SYSTEM", "messages": [{"role": "user", "content": "hi"}], "think": null}
//	{"prompt": "..."}  or  {"error": "..."}
//
// What the server does before executing a template (ollama/ollama server/routes.go, template/template.go):
// the Modelfile's SYSTEM becomes a leading system message when the request has none; every system message's
// text, joined with a blank line, is `.System`; consecutive messages of one role are merged with a blank line
// (tool results excepted). A template that names `.Messages` is executed once with them; any other is a legacy
// `.Prompt`/`.Response` template, executed once per user turn, the last time only up to its `.Response`.
package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
	"text/template"
	"text/template/parse"
	"time"
)

type request struct {
	Template string    `json:"template"`
	System   string    `json:"system"`
	Messages []message `json:"messages"`
	Think    *bool     `json:"think"`
}

type message struct {
	Role     string `json:"role"`
	Content  string `json:"content"`
	Thinking string `json:"thinking"`
	ToolName string `json:"tool_name"`
}

// templateMessage has the fields Ollama's templates may name on a message; tool calls are never sent here.
type templateMessage struct {
	Role       string
	Content    string
	Thinking   string
	Images     []string
	ToolCalls  []any
	ToolName   string
	ToolCallID string
}

// The functions Ollama's server gives every template.
var funcs = template.FuncMap{
	"json": func(v any) string {
		b, _ := json.Marshal(v)
		return string(b)
	},
	"currentDate": func(args ...string) string { return time.Now().Format("2006-01-02") },
	"yesterdayDate": func(args ...string) string {
		return time.Now().AddDate(0, 0, -1).Format("2006-01-02")
	},
}

func main() {
	in := bufio.NewReader(os.Stdin)
	out := bufio.NewWriter(os.Stdout)
	encoder := json.NewEncoder(out)
	encoder.SetEscapeHTML(false)
	for {
		line, err := in.ReadBytes('\n')
		if len(strings.TrimSpace(string(line))) > 0 {
			answer := map[string]string{}
			var req request
			if err := json.Unmarshal(line, &req); err != nil {
				answer["error"] = "bad request: " + err.Error()
			} else if prompt, err := render(req); err != nil {
				answer["error"] = err.Error()
			} else {
				answer["prompt"] = prompt
			}
			encoder.Encode(answer)
			out.Flush()
		}
		if err == io.EOF {
			return
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	}
}

func render(req request) (string, error) {
	tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(req.Template)
	if err != nil {
		return "", err
	}
	msgs := req.Messages
	if req.System != "" && (len(msgs) == 0 || msgs[0].Role != "system") {
		msgs = append([]message{{Role: "system", Content: req.System}}, msgs...)
	}
	system, collated := collate(msgs)
	think := req.Think != nil && *req.Think
	names := identifiers(tmpl.Root)
	var b strings.Builder
	if names["messages"] {
		err = tmpl.Execute(&b, map[string]any{
			"System": system, "Messages": collated, "Tools": nil, "Response": "",
			"Think": think, "ThinkLevel": "", "IsThinkSet": req.Think != nil,
		})
		return b.String(), err
	}
	if !names["response"] { // Ollama appends `{{ .Response }}` to a template that has neither
		tmpl.Root.Nodes = append(tmpl.Root.Nodes, responseNode())
	}
	return renderLegacy(tmpl, collated, think, req.Think != nil)
}

// collate merges consecutive messages of one role (tool results excepted) and collects the system prompts.
func collate(msgs []message) (string, []*templateMessage) {
	var systems []string
	var collated []*templateMessage
	for _, m := range msgs {
		if m.Role == "system" {
			systems = append(systems, m.Content)
		}
		if n := len(collated); n > 0 && collated[n-1].Role == m.Role && m.Role != "tool" {
			collated[n-1].Content += "\n\n" + m.Content
			continue
		}
		collated = append(collated, &templateMessage{Role: m.Role, Content: m.Content, Thinking: m.Thinking,
			ToolName: m.ToolName})
	}
	return strings.Join(systems, "\n\n"), collated
}

// renderLegacy executes a `.Prompt` template once per exchange; the last exchange stops before `.Response`,
// where the model's answer goes. A system message opens a new exchange; only the last one's system text counts.
func renderLegacy(tmpl *template.Template, msgs []*templateMessage, think, thinkSet bool) (string, error) {
	var b strings.Builder
	var system, prompt, response string
	values := func() map[string]any {
		return map[string]any{"System": system, "Prompt": prompt, "Response": response,
			"Think": think, "ThinkLevel": "", "IsThinkSet": thinkSet}
	}
	flush := func() error {
		err := tmpl.Execute(&b, values())
		system, prompt, response = "", "", ""
		return err
	}
	for _, m := range msgs {
		switch m.Role {
		case "system":
			if prompt != "" || response != "" {
				if err := flush(); err != nil {
					return "", err
				}
			}
			system = m.Content
		case "user":
			if response != "" {
				if err := flush(); err != nil {
					return "", err
				}
			}
			prompt = m.Content
		case "assistant":
			response = m.Content
		}
	}
	head, err := template.New("").Option("missingkey=zero").Funcs(funcs).AddParseTree("",
		&parse.Tree{Root: untilResponse(tmpl.Root.CopyList())})
	if err != nil {
		return "", err
	}
	if err := head.Execute(&b, values()); err != nil {
		return "", err
	}
	return b.String(), nil
}

// untilResponse keeps the nodes before the first `.Response`, in execution order, inside whatever encloses it.
func untilResponse(list *parse.ListNode) *parse.ListNode {
	cut := false
	var walk func(list *parse.ListNode) *parse.ListNode
	walk = func(list *parse.ListNode) *parse.ListNode {
		if list == nil {
			return nil
		}
		var kept []parse.Node
		for _, n := range list.Nodes {
			if cut {
				break
			}
			switch n := n.(type) {
			case *parse.ActionNode:
				if identifiers(n)["response"] {
					cut = true
					continue
				}
			case *parse.IfNode:
				n.List, n.ElseList = walk(n.List), walk(n.ElseList)
			case *parse.RangeNode:
				n.List, n.ElseList = walk(n.List), walk(n.ElseList)
			case *parse.WithNode:
				n.List, n.ElseList = walk(n.List), walk(n.ElseList)
			}
			kept = append(kept, n)
		}
		list.Nodes = kept
		return list
	}
	return walk(list)
}

func responseNode() parse.Node {
	tree, _ := parse.Parse("", "{{ .Response }}", "", "", funcs)
	return tree[""].Root.Nodes[0]
}

// identifiers: the lower-cased field and variable names a template node mentions, as Ollama's server
// collects them to decide between the `.Messages` and the legacy form.
func identifiers(node parse.Node) map[string]bool {
	names := map[string]bool{}
	var walk func(parse.Node)
	walk = func(node parse.Node) {
		switch n := node.(type) {
		case *parse.ListNode:
			if n != nil {
				for _, c := range n.Nodes {
					walk(c)
				}
			}
		case *parse.ActionNode:
			walk(n.Pipe)
		case *parse.TemplateNode:
			if n.Pipe != nil {
				walk(n.Pipe)
			}
		case *parse.IfNode:
			walk(&n.BranchNode)
		case *parse.RangeNode:
			walk(&n.BranchNode)
		case *parse.WithNode:
			walk(&n.BranchNode)
		case *parse.BranchNode:
			walk(n.Pipe)
			walk(n.List)
			if n.ElseList != nil {
				walk(n.ElseList)
			}
		case *parse.PipeNode:
			if n != nil {
				for _, c := range n.Cmds {
					for _, a := range c.Args {
						walk(a)
					}
				}
			}
		case *parse.FieldNode:
			for _, id := range n.Ident {
				names[strings.ToLower(id)] = true
			}
		case *parse.VariableNode:
			for _, id := range n.Ident {
				names[strings.ToLower(id)] = true
			}
		}
	}
	walk(node)
	return names
}
