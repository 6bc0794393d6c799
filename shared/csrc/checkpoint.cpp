// Activation checkpointing for tch, which exposes neither `torch.utils.checkpoint`
// nor custom autograd functions. The body of a checkpoint is a Rust closure reached
// through a C function pointer; `shared/src/model/checkpoint.rs` is its only caller
// and documents the contract.
//
// Tensors cross the boundary as `at::Tensor *`, the representation torch-sys uses
// for tch's `Tensor`, so Rust can wrap and free them with tch's own functions.

#include <ATen/autocast_mode.h>
#include <ATen/core/ivalue.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cstring>
#include <exception>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

extern "C" {
// Runs the closure on `inputs` and reports into `results` through
// `coreg_checkpoint_push_output` / `coreg_checkpoint_fail`. Must not unwind.
typedef void (*coreg_checkpoint_body)(void *closure, const at::Tensor *const *inputs,
                                      size_t n_inputs, void *results);
// Frees the closure. Must not unwind.
typedef void (*coreg_checkpoint_release)(void *closure);
// Hands one output to the caller, which takes ownership of the heap-allocated tensor.
typedef void (*coreg_checkpoint_receive)(void *receiver, at::Tensor *output);
// Hands the caller the message of the error that ended the call. Must not unwind.
typedef void (*coreg_checkpoint_receive_error)(void *receiver, const char *message,
                                               size_t length);
}

namespace coreg {

// The engine runs backward on its own threads (one per CUDA device), whose autocast
// state is not the forward's: recomputing under a different autocast state would
// differentiate different numerics than the forward produced.
struct AutocastState {
  static constexpr at::DeviceType kDevices[] = {at::kCPU, at::kCUDA};
  bool enabled[2];
  at::ScalarType dtype[2];

  static AutocastState capture() {
    AutocastState state{};
    for (size_t i = 0; i < 2; ++i) {
      state.enabled[i] = at::autocast::is_autocast_enabled(kDevices[i]);
      state.dtype[i] = at::autocast::get_autocast_dtype(kDevices[i]);
    }
    return state;
  }
};

struct BodyResults {
  variable_list outputs;
  std::optional<std::string> error;
};

// Owns the Rust closure: the autograd node keeps it alive through `saved_data`, so it
// is freed when the graph is, after any number of retained backward passes.
class Closure : public torch::CustomClassHolder {
public:
  Closure(void *data, coreg_checkpoint_body body, coreg_checkpoint_release release)
      : data_(data), body_(body), release_(release),
        forward_autocast_(AutocastState::capture()) {}
  Closure(const Closure &) = delete;
  Closure &operator=(const Closure &) = delete;
  ~Closure() override { release_(data_); }

  variable_list run(const variable_list &inputs) const {
    std::vector<const at::Tensor *> pointers;
    pointers.reserve(inputs.size());
    for (const auto &input : inputs) {
      pointers.push_back(&input);
    }
    BodyResults results;
    body_(data_, pointers.data(), pointers.size(), &results);
    if (results.error) {
      throw std::runtime_error("checkpointed function failed: " + *results.error);
    }
    return std::move(results.outputs);
  }

  const AutocastState &forward_autocast() const { return forward_autocast_; }

private:
  void *data_;
  coreg_checkpoint_body body_;
  coreg_checkpoint_release release_;
  AutocastState forward_autocast_;
};

class AutocastScope {
public:
  explicit AutocastScope(const AutocastState &state)
      : previous_(AutocastState::capture()) {
    apply(state);
    at::autocast::increment_nesting();
  }
  AutocastScope(const AutocastScope &) = delete;
  AutocastScope &operator=(const AutocastScope &) = delete;
  ~AutocastScope() {
    // Same cache discipline as `torch.autocast.__exit__`: casts cached for the
    // recomputation must not outlive it on the engine thread.
    if (at::autocast::decrement_nesting() == 0) {
      at::autocast::clear_cache();
    }
    apply(previous_);
  }

private:
  static void apply(const AutocastState &state) {
    for (size_t i = 0; i < 2; ++i) {
      at::autocast::set_autocast_enabled(AutocastState::kDevices[i], state.enabled[i]);
      at::autocast::set_autocast_dtype(AutocastState::kDevices[i], state.dtype[i]);
    }
  }

  AutocastState previous_;
};

// `tensors` holds the closure's inputs, followed by an anchor when no input requires
// grad (see `coreg_checkpoint_apply`). `precomputed`, when given, holds the forward's
// outputs already computed; otherwise the forward runs the closure (without grad, as
// `Function::apply` disables it).
struct CheckpointFunction : public torch::autograd::Function<CheckpointFunction> {
  static variable_list forward(AutogradContext *ctx, at::TensorList tensors,
                               c10::intrusive_ptr<Closure> closure,
                               variable_list *precomputed) {
    const bool anchored = precomputed != nullptr;
    variable_list inputs(tensors.begin(), tensors.end() - (anchored ? 1 : 0));
    ctx->save_for_backward(inputs);
    ctx->saved_data["anchored"] = anchored;
    // Outputs no loss uses get no gradient, rather than zeros to backpropagate.
    ctx->set_materialize_grads(false);
    variable_list outputs = anchored ? std::move(*precomputed) : closure->run(inputs);
    ctx->saved_data["closure"] = c10::IValue::make_capsule(std::move(closure));
    return outputs;
  }

  static variable_list backward(AutogradContext *ctx, variable_list grad_outputs) {
    // Throws libtorch's usual error on a second backward without retain_graph.
    const variable_list saved = ctx->get_saved_variables();
    const auto closure = c10::static_intrusive_pointer_cast<Closure>(
        ctx->saved_data.at("closure").toCapsule());
    const bool anchored = ctx->saved_data.at("anchored").toBool();

    // Detached leaves cut the recomputed graph off from the outer one, so the inner
    // backward stops at the inputs and hands their gradients back to the engine.
    variable_list inputs;
    inputs.reserve(saved.size());
    for (const auto &tensor : saved) {
      auto leaf = tensor.detach();
      if (tensor.requires_grad()) {
        leaf.requires_grad_(true);
      }
      inputs.push_back(std::move(leaf));
    }

    variable_list outputs;
    {
      at::AutoGradMode grad_mode(true);
      AutocastScope autocast_scope(closure->forward_autocast());
      outputs = closure->run(inputs);
    }
    if (outputs.size() != grad_outputs.size()) {
      throw std::runtime_error(
          "checkpointed function returned " + std::to_string(outputs.size()) +
          " tensors on recomputation but " + std::to_string(grad_outputs.size()) +
          " in the forward pass; it must be deterministic");
    }

    variable_list roots;
    variable_list root_grads;
    for (size_t i = 0; i < outputs.size(); ++i) {
      if (outputs[i].requires_grad() && grad_outputs[i].defined()) {
        roots.push_back(outputs[i]);
        root_grads.push_back(grad_outputs[i]);
      }
    }
    if (!roots.empty()) {
      // Accumulates into the `.grad` of every leaf the closure used: the detached
      // inputs and the parameters it closes over, as torch's reentrant checkpoint.
      torch::autograd::backward(roots, root_grads);
    }

    variable_list input_grads;
    input_grads.reserve(inputs.size() + 3);
    for (const auto &input : inputs) {
      input_grads.push_back(input.requires_grad() ? input.grad() : at::Tensor());
    }
    if (anchored) {
      input_grads.emplace_back();
    }
    // The `closure` and `precomputed` arguments of `forward`.
    input_grads.emplace_back();
    input_grads.emplace_back();
    return input_grads;
  }
};

} // namespace coreg

using coreg::BodyResults;
using coreg::CheckpointFunction;
using coreg::Closure;

extern "C" {

void coreg_checkpoint_push_output(void *results, const at::Tensor *output) {
  auto *body_results = static_cast<BodyResults *>(results);
  try {
    body_results->outputs.push_back(*output);
  } catch (const std::exception &e) {
    body_results->error = e.what();
  }
}

void coreg_checkpoint_fail(void *results, const char *message, size_t length) {
  auto *body_results = static_cast<BodyResults *>(results);
  try {
    body_results->error = std::string(message, length);
  } catch (const std::exception &) {
    body_results->error.emplace();
  }
}

// Takes ownership of `closure` at once: `release` runs exactly once whatever happens,
// either before this returns or when the autograd graph holding it is destroyed.
// Returns whether it succeeded; on failure `receive_error` got the reason.
bool coreg_checkpoint_apply(const at::Tensor *const *inputs, size_t n_inputs,
                            void *closure, coreg_checkpoint_body body,
                            coreg_checkpoint_release release, void *receiver,
                            coreg_checkpoint_receive receive,
                            coreg_checkpoint_receive_error receive_error) {
  try {
    c10::intrusive_ptr<Closure> owned;
    try {
      owned = c10::make_intrusive<Closure>(closure, body, release);
    } catch (...) {
      release(closure);
      throw;
    }
    variable_list tensors;
    tensors.reserve(n_inputs + 1);
    bool any_requires_grad = false;
    for (size_t i = 0; i < n_inputs; ++i) {
      tensors.push_back(*inputs[i]);
      any_requires_grad = any_requires_grad || inputs[i]->requires_grad();
    }

    variable_list outputs;
    if (!torch::autograd::GradMode::is_enabled()) {
      outputs = owned->run(tensors);
    } else if (any_requires_grad) {
      outputs = CheckpointFunction::apply(at::TensorList(tensors), std::move(owned),
                                          nullptr);
    } else {
      // Only the closure knows whether the parameters it closes over require grad, and
      // a node without a differentiable input is never reached by backward. Running
      // with grad tells; the graph it builds lives only as long as this block's own
      // recomputation would, and an anchor input then makes the node reachable.
      variable_list probed = owned->run(tensors);
      bool any_output_requires_grad = false;
      for (const auto &output : probed) {
        any_output_requires_grad = any_output_requires_grad || output.requires_grad();
      }
      if (!any_output_requires_grad) {
        outputs = std::move(probed);
      } else {
        variable_list precomputed;
        precomputed.reserve(probed.size());
        for (const auto &output : probed) {
          precomputed.push_back(output.detach());
        }
        probed.clear();
        tensors.push_back(at::empty({0}).requires_grad_(true));
        outputs = CheckpointFunction::apply(at::TensorList(tensors), std::move(owned),
                                            &precomputed);
      }
    }

    for (auto &output : outputs) {
      receive(receiver, new at::Tensor(std::move(output)));
    }
    return true;
  } catch (const std::exception &e) {
    receive_error(receiver, e.what(), std::strlen(e.what()));
  } catch (...) {
    static constexpr char kUnknown[] = "unknown C++ exception in checkpoint";
    receive_error(receiver, kUnknown, sizeof(kUnknown) - 1);
  }
  return false;
}

} // extern "C"
