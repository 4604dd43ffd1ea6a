#!/usr/bin/env node
// Validate AsyncAPI documents (YAML or JSON) with the reference parser, @asyncapi/parser.
// Usage: node check.mjs FILE... ("-" reads standard input).
// Prints one JSON line per file: {"file", "valid", "diagnostics": [{severity, code, message, path}]}.
// Exit 0 when every document parses with no error-level diagnostic; 1 otherwise; 2 on usage.
import { readFileSync } from "node:fs";
import { Parser } from "@asyncapi/parser";

const SEVERITY = ["error", "warning", "info", "hint"];
const files = process.argv.slice(2);
if (files.length === 0) {
  console.error("usage: node check.mjs FILE... (- for standard input)");
  process.exit(2);
}
const parser = new Parser();
let failed = false;
for (const file of files) {
  const text = readFileSync(file === "-" ? 0 : file, "utf8");
  const { document, diagnostics } = await parser.parse(text);
  const out = diagnostics.map((d) => ({
    severity: SEVERITY[d.severity] ?? String(d.severity),
    code: d.code,
    message: d.message,
    path: d.path.join("."),
  }));
  const valid = document !== undefined && !out.some((d) => d.severity === "error");
  failed ||= !valid;
  console.log(JSON.stringify({ file, valid, diagnostics: out }));
}
process.exit(failed ? 1 : 0);
