// Drives Debian's chromium through playwright-core for tests/test_browser.py: one JSON
// command per line on stdin, one JSON answer per line on stdout.
//   {"cmd": "open", "url": "..."}                 -> {"page": N}  (a fresh browser context)
//   {"cmd": "eval", "page": N, "js": "async () => ..."}  -> {"value": ...}
//   {"cmd": "wait", "page": N, "js": "() => ...", "timeoutMs": 10000} -> {"value": ...}
//   {"cmd": "reload", "page": N} / {"cmd": "close", "page": N} / {"cmd": "quit"}
// An error answers {"error": "..."}; the process exits after "quit" or at end of input.
import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const pages = new Map();
let next = 1;

async function run(command) {
  switch (command.cmd) {
    case "open": {
      const context = await browser.newContext();
      const page = await context.newPage();
      const logs = [];
      page.on("console", (m) => logs.push(m.text()));
      page.on("pageerror", (e) => logs.push(`pageerror: ${e.message}`));
      await page.goto(command.url);
      const id = next++;
      pages.set(id, { page, context, logs });
      return { page: id };
    }
    case "eval":
      return { value: await pages.get(command.page).page.evaluate(`(${command.js})()`) };
    case "wait": {
      const handle = await pages.get(command.page).page.waitForFunction(
        `(${command.js})()`, null, { timeout: command.timeoutMs ?? 10000 });
      return { value: await handle.jsonValue() };
    }
    case "reload":
      await pages.get(command.page).page.reload();
      return {};
    case "logs":
      return { value: pages.get(command.page).logs };
    case "close": {
      const { context } = pages.get(command.page);
      pages.delete(command.page);
      await context.close();
      return {};
    }
    default:
      throw new Error(`unknown command ${command.cmd}`);
  }
}

const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  const command = JSON.parse(line);
  if (command.cmd === "quit") break;
  let answer;
  try {
    answer = await run(command);
  } catch (err) {
    const logs = command.page && pages.get(command.page) ? pages.get(command.page).logs : [];
    answer = { error: `${err.message}\npage console: ${logs.slice(-20).join(" | ")}` };
  }
  process.stdout.write(JSON.stringify(answer) + "\n");
}
await browser.close();
