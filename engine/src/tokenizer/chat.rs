//! Chat templates: Hugging Face Jinja templates rendered with minijinja (ChatML when none is given).

use std::sync::Arc;

use minijinja::{Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};

use super::TokenizerError;

/// One chat turn as the OpenAI API sends it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// ChatML, the template used when a model ships none.
const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// A compiled chat template plus the special-token strings it may reference.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Arc<Environment<'static>>,
    bos_token: String,
    eos_token: String,
}

fn raise_exception(msg: String) -> Result<String, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

impl ChatTemplate {
    /// Compile a Hugging Face chat template.
    pub fn new(source: &str) -> Result<Self, TokenizerError> {
        let mut env = Environment::new();
        // HF templates rely on Python string/dict methods (.strip(), .items(), ...).
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        // Jinja2 keeps a single trailing newline stripped, as transformers renders it.
        env.set_keep_trailing_newline(false);
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| TokenizerError::Template(e.to_string()))?;
        Ok(Self {
            env: Arc::new(env),
            bos_token: String::new(),
            eos_token: String::new(),
        })
    }

    pub fn chatml() -> Self {
        Self::new(CHATML).expect("the built-in ChatML template compiles")
    }

    /// Set the strings bound to `bos_token` / `eos_token` in the template.
    pub fn with_special_tokens(mut self, bos: Option<String>, eos: Option<String>) -> Self {
        self.bos_token = bos.unwrap_or_default();
        self.eos_token = eos.unwrap_or_default();
        self
    }

    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| TokenizerError::Template(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
        .map_err(|e| {
            // Show the template's own message for raise_exception.
            let detail = match e.detail() {
                Some(d) => d.to_string(),
                None => e.to_string(),
            };
            TokenizerError::Template(detail)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }

    #[test]
    fn chatml_fallback() {
        let t = ChatTemplate::chatml();
        let out = t.render(&[msg("user", "hi")], true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
        let out = t.render(&[msg("user", "hi")], false).unwrap();
        assert_eq!(out, "<|im_start|>user\nhi<|im_end|>\n");
    }

    #[test]
    fn hf_idioms_raise_bos_loop_controls_and_python_methods() {
        let src = "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('tools are not supported') }}{% endif %}{% if m.role == 'skip' %}{% continue %}{% endif %}[{{ m['role'] | upper }}] {{ m['content'].strip() }}{% if loop.last %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}[ASSISTANT]{% endif %}";
        let t = ChatTemplate::new(src)
            .unwrap()
            .with_special_tokens(Some("<s>".into()), Some("</s>".into()));
        let out = t
            .render(
                &[
                    msg("system", "  be brief "),
                    msg("skip", "x"),
                    msg("user", "hi"),
                ],
                true,
            )
            .unwrap();
        assert_eq!(out, "<s>[SYSTEM] be brief\n[USER] hi</s>\n[ASSISTANT]");
        let err = t.render(&[msg("tool", "x")], false).unwrap_err();
        assert!(err.to_string().contains("tools are not supported"), "{err}");
        assert!(ChatTemplate::new("{% for %}").is_err());
    }
}
