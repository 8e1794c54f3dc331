// A backend in another language, with nothing of inferq installed: the official `openai` npm
// package against the gateway. Prints one JSON object for tests/service/test_gateway_node.py.
// Env: OPENAI_BASE_URL (the gateway's …/v1) and OPENAI_API_KEY, as the SDK reads them, and
// MODEL.
import OpenAI from "openai";

const client = new OpenAI({ maxRetries: 0 });
const model = process.env.MODEL;
const messages = [{ role: "user", content: "Say hello." }];

const { data: done, response } = await client.chat.completions
  .create({ model, messages, max_tokens: 4, temperature: 0 })
  .withResponse();

const chunks = [];
const stream = await client.chat.completions.create({
  model, messages, max_tokens: 3, stream: true, stream_options: { include_usage: true },
});
for await (const chunk of stream) chunks.push(chunk);

const completion = await client.completions.create({ model, prompt: "Once", max_tokens: 2 });
const models = [];
for await (const m of client.models.list()) models.push(m.id);

let refused = null;
try {
  await client.chat.completions.create({ model, messages, n: 2 });
} catch (err) {
  refused = { status: err.status, param: err.param, type: err.type };
}

console.log(JSON.stringify({
  jobId: response.headers.get("x-inferq-job-id"),
  done,
  chunks,
  completion,
  models,
  refused,
}));
