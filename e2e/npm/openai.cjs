// The official OpenAI npm client against llorch's /v1, as a new user
// drives it. Run by e2e/npm_test.go (TestOpenAINPMClient) with
// OPENAI_BASE_URL, OPENAI_API_KEY and LLORCH_MODEL set; the client comes
// from `just tools` (NODE_PATH=bin/openai-npm/node_modules). Prints one
// line per check ("ok <check>" or "FAIL <check>: why") and exits 1 when
// any failed.
const OpenAI = require('openai');

const model = process.env.LLORCH_MODEL;
const client = new OpenAI({ maxRetries: 0, timeout: 60_000 });
let failed = 0;

function assert(cond, msg) {
  if (!cond) throw new Error(msg);
}

async function check(name, fn) {
  try {
    await fn();
    console.log(`ok ${name}`);
  } catch (err) {
    failed++;
    console.log(`FAIL ${name}: ${err && err.stack ? err.stack : err}`);
  }
}

// refused expects a 400 whose error names param.
async function refused(param, fn) {
  try {
    await fn();
  } catch (err) {
    assert(err instanceof OpenAI.BadRequestError, `want a 400, got ${err}`);
    assert(err.param === param, `want param ${param}, got ${err.param} (${err.message})`);
    return;
  }
  throw new Error(`the request with ${param} was accepted`);
}

// validates is the subset of JSON Schema the check's schema uses.
function validates(doc, schema) {
  if (schema.type === 'object') {
    if (typeof doc !== 'object' || doc === null || Array.isArray(doc)) return false;
    for (const k of schema.required || []) if (!(k in doc)) return false;
    for (const k of Object.keys(doc)) {
      if (!(k in schema.properties)) return schema.additionalProperties !== false;
      if (!validates(doc[k], schema.properties[k])) return false;
    }
    return true;
  }
  if (schema.enum) return schema.enum.includes(doc);
  if (schema.type === 'string') return typeof doc === 'string' && (schema.maxLength === undefined || [...doc].length <= schema.maxLength);
  if (schema.type === 'integer') return Number.isInteger(doc);
  if (schema.type === 'boolean') return typeof doc === 'boolean';
  return false;
}

const chat = { model, messages: [{ role: 'system', content: 'be brief' }, { role: 'user', content: 'Hello there' }], max_tokens: 16, temperature: 0 };

async function main() {
  await check('models.list', async () => {
    const ids = [];
    for await (const m of client.models.list()) ids.push(m.id);
    assert(ids.includes(model), `${model} not in ${ids}`);
  });
  await check('models.retrieve', async () => {
    const m = await client.models.retrieve(model);
    assert(m.id === model && m.object === 'model', JSON.stringify(m));
    try {
      await client.models.retrieve('no-such-model');
      throw new Error('a missing model was found');
    } catch (err) {
      assert(err instanceof OpenAI.NotFoundError, `want 404, got ${err}`);
      assert(err.code === 'model_not_found', `code ${err.code}`);
    }
  });

  let whole = '';
  await check('chat.completions.create', async () => {
    const r = await client.chat.completions.create(chat);
    whole = r.choices[0].message.content;
    assert(whole.length > 0, 'empty answer');
    assert(r.choices[0].finish_reason === 'length', r.choices[0].finish_reason);
    assert(r.usage.completion_tokens === 16 && r.usage.prompt_tokens > 0, JSON.stringify(r.usage));
  });
  await check('chat.completions.create stream', async () => {
    const stream = await client.chat.completions.create({ ...chat, stream: true, stream_options: { include_usage: true } });
    let text = '', usage = null;
    for await (const chunk of stream) {
      if (chunk.choices.length > 0) text += chunk.choices[0].delta.content || '';
      if (chunk.usage) usage = chunk.usage;
    }
    assert(text === whole, `streamed ${JSON.stringify(text)} != ${JSON.stringify(whole)}`);
    assert(usage && usage.completion_tokens === 16, JSON.stringify(usage));
  });
  await check('chat, the next turn from the cache', async () => {
    const next = { ...chat, messages: [...chat.messages, { role: 'assistant', content: whole }, { role: 'user', content: 'and then?' }] };
    const r = await client.chat.completions.create(next);
    const cached = r.usage.prompt_tokens_details && r.usage.prompt_tokens_details.cached_tokens;
    assert(cached > 0 && cached < r.usage.prompt_tokens, JSON.stringify(r.usage));
  });
  await check('completions.create with logprobs', async () => {
    const r = await client.completions.create({ model, prompt: 'Once upon a time', max_tokens: 6, temperature: 0, logprobs: 2 });
    const lp = r.choices[0].logprobs;
    assert(lp.tokens.length === 6 && lp.token_logprobs.length === 6, JSON.stringify(lp));
    assert(lp.tokens.join('') === r.choices[0].text, 'tokens make the text');
  });
  await check('response_format json_object', async () => {
    const r = await client.chat.completions.create({ ...chat, max_tokens: 60, response_format: { type: 'json_object' } });
    const text = r.choices[0].message.content;
    if (r.choices[0].finish_reason === 'stop') JSON.parse(text);
    assert(text.startsWith('{'), text);
  });
  await check('response_format json_schema', async () => {
    // Strings bounded: the tiny model would fill an open one to the limit.
    const schema = { type: 'object', properties: { ok: { type: 'boolean' }, color: { enum: ['red', 'green'] }, note: { type: 'string', maxLength: 5 } },
      required: ['ok', 'color'], additionalProperties: false };
    const r = await client.chat.completions.create({ ...chat, max_tokens: 200, temperature: 1, seed: 3,
      response_format: { type: 'json_schema', json_schema: { name: 'answer', schema, strict: true } } });
    assert(r.choices[0].finish_reason === 'stop', `finish ${r.choices[0].finish_reason}: ${r.choices[0].message.content}`);
    const doc = JSON.parse(r.choices[0].message.content);
    assert(validates(doc, schema), `${JSON.stringify(doc)} does not validate`);
  });
  await check('logprobs, top_logprobs (and streamed)', async () => {
    const p = { ...chat, max_tokens: 8, logprobs: true, top_logprobs: 3 };
    const r = await client.chat.completions.create(p);
    const lps = r.choices[0].logprobs.content;
    assert(lps.length === 8, `${lps.length} log probabilities`);
    for (const lp of lps) {
      assert(lp.top_logprobs.length === 3 && lp.top_logprobs[0].token === lp.token && lp.logprob <= 0, JSON.stringify(lp));
    }
    const stream = await client.chat.completions.create({ ...p, stream: true });
    const streamed = [];
    for await (const chunk of stream) {
      if (chunk.choices.length > 0 && chunk.choices[0].logprobs) streamed.push(...chunk.choices[0].logprobs.content);
    }
    assert(streamed.map((x) => x.token).join('') === lps.map((x) => x.token).join(''), 'the same tokens streamed');
  });
  await check('responses.create (and streamed)', async () => {
    const p = { model, instructions: 'be brief', input: 'Hello there', max_output_tokens: 16, temperature: 0 };
    const r = await client.responses.create(p);
    assert(r.output_text.length > 0 && r.status === 'incomplete', `${r.status}: ${r.output_text}`);
    assert(r.usage.input_tokens > 0 && r.usage.output_tokens === 16, JSON.stringify(r.usage));
    const stream = await client.responses.create({ ...p, stream: true });
    let deltas = '', done = null;
    for await (const ev of stream) {
      if (ev.type === 'response.output_text.delta') deltas += ev.delta;
      if (ev.type === 'response.completed' || ev.type === 'response.incomplete') done = ev.response;
    }
    assert(done && deltas === r.output_text, `streamed ${JSON.stringify(deltas)}`);
  });
  await check('n above 1 is refused naming n', () => refused('n', () => client.chat.completions.create({ ...chat, n: 2 })));
  await check('tools are refused naming tools', () => refused('tools', () => client.chat.completions.create({ ...chat,
    tools: [{ type: 'function', function: { name: 'now', parameters: { type: 'object', properties: {} } } }] })));
  await check('an unknown field is refused naming it', () => refused('frobnicate', () => client.chat.completions.create({ ...chat, frobnicate: 1 })));
  await check('a stream the client aborts', async () => {
    const ac = new AbortController();
    const stream = await client.chat.completions.create({ ...chat, max_tokens: 400, stream: true }, { signal: ac.signal });
    let n = 0;
    try {
      for await (const chunk of stream) {
        if (++n === 3) ac.abort();
      }
    } catch (err) {
      assert(err instanceof OpenAI.APIUserAbortError || err.name === 'AbortError', `${err}`);
    }
    assert(n >= 3, `${n} chunks`);
    const r = await client.chat.completions.create(chat); // the server goes on serving
    assert(r.choices[0].message.content === whole, 'the same answer after an abort');
  });
  if (failed > 0) {
    console.log(`${failed} checks failed`);
    process.exit(1);
  }
}

main().catch((err) => {
  console.log(`FAIL main: ${err.stack}`);
  process.exit(1);
});
