/*
 * TensorRT interface of the TokenGather op (IPluginV3 + IPluginCreatorV3One). The work is done by
 * tokenGatherKernel.cu; this file only adapts TensorRT's calls to it. Builds against TensorRT 10.3+ and 11.x.
 *
 *   inputs:  0 tokens [B, N, C] float32/float16, 1 scores [B, N-1] float32/float16 (independent of tokens)
 *   outputs: 0 kept tokens [B, 1+K, C] (type of tokens), 1 (with_indices = 1 only) patch indices [B, K] int32
 */
#pragma once

#include "tokenGatherConstants.h"

#include <NvInferRuntime.h>

#include <array>
#include <cstdint>
#include <vector>

namespace token_gather
{

class TokenGatherPlugin final : public nvinfer1::IPluginV3,
                                public nvinfer1::IPluginV3OneCore,
                                public nvinfer1::IPluginV3OneBuild,
                                public nvinfer1::IPluginV3OneRuntime
{
public:
    //! Attributes must already be valid (TokenGatherPluginCreator::createPlugin checks them).
    TokenGatherPlugin(int32_t keep, bool withIndices) noexcept;
    TokenGatherPlugin(TokenGatherPlugin const& other) noexcept;
    TokenGatherPlugin& operator=(TokenGatherPlugin const&) = delete;
    ~TokenGatherPlugin() override = default;

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

    // IPluginV3OneBuild
    int32_t getNbOutputs() const noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs,
        nvinfer1::DimsExprs const* shapeInputs, int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs,
        int32_t nbOutputs, nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::PluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

private:
    int32_t mKeep;
    int32_t mWithIndices; // int32 rather than bool: getFieldsToSerialize points TensorRT at it as kINT32
    std::array<nvinfer1::PluginField, 2> mSerializedFields;
    nvinfer1::PluginFieldCollection mSerializedCollection{};
};

class TokenGatherPluginCreator final : public nvinfer1::IPluginCreatorV3One
{
public:
    TokenGatherPluginCreator() noexcept;
    ~TokenGatherPluginCreator() override = default;

    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept override;

private:
    std::array<nvinfer1::PluginField, 2> mFieldNames;
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

} // namespace token_gather
